// Operations (README "Deploying", "Logs and signals"): stdio under inetd-style launchers, systemd socket
// activation, privilege drop, log formats, signals, and the shipped examples,
// each run for real on this machine.

import { spawn, spawnSync } from "node:child_process";
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { describe, expect, it } from "vitest";
import { serve } from "../smtp521.ts";
import {
  BIN,
  FILE,
  forAnyUser,
  greeting,
  has,
  isRoot,
  listening,
  ROOT,
  run,
  type Runtime,
  RUNTIMES,
  start,
  talk,
  unless,
  until,
  within,
} from "./helpers.ts";

const NAME = "mail.example.org"; // the name the examples use
const CLOSING = `221 ${NAME} closing connection\r\n`;
const EXAMPLES = join(ROOT, "examples");
const ALL = Object.keys(RUNTIMES) as Runtime[];

/** The flags an example passes to smtp521.ts, read from its ExecStart= line. */
function exampleFlags(unit: string): string[] {
  const exec = /^ExecStart=(.*)$/m.exec(readFileSync(join(EXAMPLES, unit), "utf8"))![1];
  return exec.split(/\s+/).slice(
    exec.split(/\s+/).findIndex((word) => word.endsWith("smtp521.ts")) + 1,
  );
}

/** A port that was free a moment ago, for launchers that bind it themselves. */
async function freePort(): Promise<number> {
  const server = createServer().listen(0, "127.0.0.1");
  await new Promise((resolve) => server.once("listening", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * Run `command` (a launcher that binds `port`), wait until the port listens, talk to it once,
 * and wait for the session's line on stderr (unless `logged` is null: a launcher that does not
 * pass it on). Every wait is for the event itself, bounded far above what a busy machine needs.
 */
async function launch(
  command: string[],
  port: number,
  send: string,
  { halfClose = false, logged = /event=session .*\n/ as RegExp | null } = {},
) {
  const child = spawn(command[0], command.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (chunk) => (stderr += chunk));
  const exited = new Promise((resolve) => child.on("exit", resolve));
  try {
    await until(
      () => listening(port) || child.exitCode !== null,
      20_000,
      `${command[0]} to listen on ${port}`,
    );
    expect(child.exitCode, `${command[0]} exited early: ${stderr}`).toBe(null);
    const got = await talk(port, send, { halfClose, ms: 15_000 });
    if (logged) {
      await until(() => logged.test(stderr), 15_000, `a session line on stderr; got: ${stderr}`);
    }
    return { got, stderr };
  } finally {
    child.kill("SIGTERM");
    await within(exited, 10_000, `${command[0]} to exit on SIGTERM`).catch(() =>
      child.kill("SIGKILL")
    );
  }
}

/** systemd `Accept=yes` (the inetd example): one process per connection, the socket on stdin and stdout. */
const acceptYes = (
  port: number,
) => ["systemd-socket-activate", "--accept", "--inetd", "-l", `127.0.0.1:${port}`];

const noSocat = has("socat") ? "" : "socat is not installed (.ci/run installs it)";
const noTcpserver = has("tcpserver")
  ? ""
  : "tcpserver is not installed (.ci/run installs ucspi-tcp)";
const noXinetd = !has("xinetd")
  ? "xinetd is not installed (.ci/run installs it)"
  : isRoot
  ? ""
  : "xinetd needs root";
const noRoot = isRoot ? "" : "--user needs root";
const noAnalyze = has("systemd-analyze") ? "" : "systemd-analyze is not installed";

describe("--stdio: one session on standard input and output", () => {
  it.each(ALL)("on %s over pipes: replies on stdout only, the log line on stderr", (runtime) => {
    const [command, ...pre] = RUNTIMES[runtime];
    const got = spawnSync(command, [...pre, "--stdio", "--hostname", NAME], {
      input: "EHLO client.example\r\nQUIT\r\n",
      encoding: "latin1",
      timeout: 15_000,
    });
    expect(got.status).toBe(0);
    expect(got.stdout).toBe(greeting(NAME).repeat(2) + CLOSING);
    expect(got.stderr).toMatch(
      /^time=\S+ event=session remote=- local_port=- mode=greet duration_ms=\d+ lines=2 end=quit\n$/,
    );
  });

  it.each(ALL)(
    "on %s under systemd Accept=yes (the inetd example): the socket's addresses",
    async (runtime) => {
      const port = await freePort();
      const [command, ...pre] = RUNTIMES[runtime];
      const { got, stderr } = await launch(
        [...acceptYes(port), command, ...pre, ...exampleFlags("smtp521-inetd@.service")],
        port,
        "NOOP\r\nQUIT\r\n",
      );
      expect(got.text).toBe(greeting(NAME).repeat(2) + CLOSING);
      // Node and Deno open descriptor 0 as the socket and log its peer; Bun cannot, and logs "-".
      const remote = runtime === "bun" ? "-" : "127\\.0\\.0\\.1:\\d+";
      const localPort = runtime === "bun" ? "-" : String(port);
      expect(stderr).toMatch(
        new RegExp(
          `event=session remote=${remote} local_port=${localPort} mode=greet .* lines=2 end=quit`,
        ),
      );
    },
  );

  it.each(ALL)(
    "on %s under systemd Accept=yes, a client's FIN after a line: the reply, then its FIN",
    async (runtime) => {
      const port = await freePort();
      const [command, ...pre] = RUNTIMES[runtime];
      const flags = exampleFlags("smtp521-inetd@.service");
      const { got, stderr } = await launch(
        [...acceptYes(port), command, ...pre, ...flags],
        port,
        "NOOP\r\n",
        {
          halfClose: true,
        },
      );
      expect(got).toMatchObject({ text: greeting(NAME).repeat(2), ending: "fin" });
      expect(stderr).toMatch(/event=session .* lines=1 end=client-closed/);
    },
  );

  it.each(ALL)(
    "on %s under systemd Accept=yes without --hostname: names itself by the local address",
    async (runtime) => {
      const port = await freePort();
      const [command, ...pre] = RUNTIMES[runtime];
      const { got, stderr } = await launch(
        [...acceptYes(port), command, ...pre, "--stdio"],
        port,
        "QUIT\r\n",
      );
      if (runtime === "bun") {
        // No socket addresses on Bun: tcpserver's variables, then the system name, then localhost with a warning.
        expect(got.text).toMatch(
          /^521 \S+ does not accept mail\r\n221 \S+ closing connection\r\n$/,
        );
      } else {
        expect(got.text).toBe(greeting("[127.0.0.1]") + "221 [127.0.0.1] closing connection\r\n");
        expect(stderr).not.toContain("event=warning");
      }
    },
  );

  it("on Deno with --allow-net only under tcpserver-style variables it does not prompt, it warns", () => {
    const [command, ...pre] = RUNTIMES.deno;
    const got = spawnSync(command, [...pre, "--stdio"], {
      input: "QUIT\r\n",
      encoding: "latin1",
      timeout: 15_000,
      env: { ...process.env, TCPLOCALIP: "192.0.2.7", TCPREMOTEIP: "198.51.100.9" },
    });
    // The environment may not be read without --allow-env: the name falls back to localhost.
    expect(got.status).toBe(0);
    expect(got.stdout).toBe(
      "521 localhost does not accept mail\r\n221 localhost closing connection\r\n",
    );
    expect(got.stderr).toContain(
      'event=warning detail="no name for replies: using localhost; pass --hostname"',
    );
  });

  it("on Node under tcpserver-style variables: TCPLOCALIP names it, TCPREMOTEIP is logged", () => {
    const got = spawnSync(RUNTIMES.node[0], [FILE, "--stdio"], {
      input: "QUIT\r\n",
      encoding: "latin1",
      timeout: 15_000,
      env: {
        ...process.env,
        TCPLOCALIP: "192.0.2.7",
        TCPREMOTEIP: "198.51.100.9",
        TCPREMOTEPORT: "4321",
      },
    });
    expect(got.stdout).toBe(
      "521 [192.0.2.7] does not accept mail\r\n221 [192.0.2.7] closing connection\r\n",
    );
    expect(got.stderr).toContain("remote=198.51.100.9:4321");
  });

  it.skipIf(noSocat).each(ALL)(unless("on %s under socat", noSocat), async (runtime) => {
    const port = await freePort();
    const exec = [...RUNTIMES[runtime], "--stdio", "--hostname", NAME].join(" ");
    const { got, stderr } = await launch(
      ["socat", `TCP-LISTEN:${port},bind=127.0.0.1,reuseaddr,fork`, `EXEC:${exec}`],
      port,
      "EHLO client.example\r\nQUIT\r\n",
    );
    expect(got.text).toBe(greeting(NAME).repeat(2) + CLOSING);
    expect(stderr).toMatch(/event=session .* lines=2 end=quit/);
  });
});

describe("systemd socket activation: --listen fd:3 (the smtp521-node example)", () => {
  it.each(["node", "bun"] as const)("on %s: serves on the inherited socket", async (runtime) => {
    // systemd-socket-activate binds the port and starts the service at the first connection.
    const port = await freePort();
    const [command, ...pre] = RUNTIMES[runtime];
    const { got, stderr } = await launch(
      [
        "systemd-socket-activate",
        "-l",
        `127.0.0.1:${port}`,
        command,
        ...pre,
        ...exampleFlags("smtp521-node.service"),
      ],
      port,
      "EHLO client.example\r\nQUIT\r\n",
    );
    expect(got.text).toBe(greeting(NAME).repeat(2) + CLOSING);
    expect(stderr).toMatch(new RegExp(`event=start .* listen=127\\.0\\.0\\.1:${port} `));
    expect(stderr).toMatch(/event=session remote=127\.0\.0\.1:\d+ .* lines=2 end=quit/);
  });

  it("on deno: exits 2 saying Deno cannot accept on an inherited socket and what to use", async () => {
    const [command, ...pre] = RUNTIMES.deno;
    const got = await run(command, [...pre, "--listen", "fd:3"]);
    expect(got.code).toBe(2);
    expect(got.stderr).toBe(
      "smtp521: --listen fd:N: Deno cannot accept on an inherited socket; use --stdio with systemd Accept=yes, or --listen ADDR:PORT\n",
    );
  });
});

describe("--user: drop privileges after binding", () => {
  it.skipIf(noRoot).each(["node", "bun"] as const)(
    unless("on %s: runs as nobody afterwards and still serves", noRoot),
    async (runtime) => {
      const server = await start(runtime, ["--user", "nobody", "--hostname", NAME]);
      try {
        const status = readFileSync(`/proc/${server.child.pid}/status`, "utf8");
        expect(/^Uid:\s+(.*)$/m.exec(status)![1].split(/\s+/)).toEqual([
          "65534",
          "65534",
          "65534",
          "65534",
        ]);
        expect(/^Gid:\s+(.*)$/m.exec(status)![1].split(/\s+/)).toEqual([
          "65534",
          "65534",
          "65534",
          "65534",
        ]);
        expect(server.log.find((l) => l.includes("event=start"))).toMatch(
          / uid=65534 gid=65534 groups=65534 /,
        );
        expect((await talk(server.port, "QUIT\r\n")).text).toBe(greeting(NAME) + CLOSING);
      } finally {
        await server.stop();
      }
    },
  );

  it("on deno: exits 2 pointing to systemd User=/DynamicUser= or to Node/Bun", async () => {
    const [command, ...pre] = RUNTIMES.deno;
    const got = await run(command, [...pre, "--user", "nobody", "--port", "0"]);
    expect(got.code).toBe(2);
    expect(got.stderr).toMatch(
      /^smtp521: --user: Deno has no setgroups.*User= or DynamicUser=.*Node or Bun\n$/,
    );
  });

  it.skipIf(noRoot).each(["node", "bun"] as const)(
    unless("on %s, --stdio: runs as nobody before the session (inetd starts it as root)", noRoot),
    async (runtime) => {
      const [command, ...args] = RUNTIMES[runtime];
      const child = spawn(command, [...args, "--stdio", "--user", "nobody", "--hostname", NAME]);
      let out = "";
      child.stdout!.on("data", (chunk) => (out += chunk));
      const exited = new Promise((resolve) => child.on("exit", resolve));
      try {
        await until(() => out.endsWith("\r\n") || child.exitCode !== null, 15_000, "the greeting");
        const status = readFileSync(`/proc/${child.pid}/status`, "utf8");
        expect(/^Uid:\s+(.*)$/m.exec(status)![1].split(/\s+/)).toEqual(Array(4).fill("65534"));
        expect(/^Gid:\s+(.*)$/m.exec(status)![1].split(/\s+/)).toEqual(Array(4).fill("65534"));
        child.stdin!.end("QUIT\r\n");
        expect(await within(exited, 15_000, "the exit")).toBe(0);
        expect(out).toBe(greeting(NAME) + CLOSING);
      } finally {
        if (child.exitCode === null) child.kill("SIGKILL");
      }
    },
  );

  it.skipIf(noRoot)(
    unless("--stdio with an unknown user exits 1 with one line, before the session", noRoot),
    async () => {
      const got = await run(RUNTIMES.node[0], [FILE, "--stdio", "--user", "no-such-user-521"]);
      expect(got.code).toBe(1);
      expect(got.stdout).toBe(""); // no greeting: the session never began
      expect(got.stderr).toMatch(
        /^smtp521: --user: "no-such-user-521" is not in \/etc\/passwd; give NAME:GROUP\n$/,
      );
    },
  );

  it.skipIf(noRoot)(
    unless("an unknown user exits 1 with one line, without serving", noRoot),
    async () => {
      const got = await run(RUNTIMES.node[0], [FILE, "--port", "0", "--user", "no-such-user-521"]);
      expect(got.code).toBe(1);
      expect(got.stderr).toMatch(
        /^smtp521: --user: "no-such-user-521" is not in \/etc\/passwd; give NAME:GROUP\n$/,
      );
    },
  );
});

describe("logs", () => {
  it.each(ALL)(
    "on %s, --log json: every stderr line is a JSON object with the fields",
    async (runtime) => {
      const server = await start(runtime, ["--log", "json", "--hostname", NAME]);
      await talk(server.port, "NOOP\r\nQUIT\r\n");
      await server.waitFor(/"event":"session"/);
      expect(await server.stop()).toBe(0);
      const lines = server.log.filter(Boolean).map((line) => JSON.parse(line));
      expect(lines.map((l) => l.event)).toEqual(["start", "session", "stop"]);
      expect(lines[0]).toMatchObject({
        mode: "greet",
        name: NAME,
        name_source: "--hostname",
        version: expect.any(String),
      });
      expect(lines[1]).toEqual({
        time: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
        event: "session",
        remote: expect.stringMatching(/^(127\.0\.0\.1|\[::1\]):\d+$/),
        local_port: server.port,
        mode: "greet",
        duration_ms: expect.any(Number),
        lines: 2,
        end: "quit",
      });
      expect(lines[2]).toMatchObject({ signal: "SIGTERM", sessions: 1, quit: 1 });
    },
  );

  it("--log text: every line is key=value pairs, values with spaces quoted", async () => {
    const server = await start("node", ["--hostname", NAME]);
    await talk(server.port, "QUIT\r\n");
    await server.waitFor(/event=session/);
    await server.stop();
    const pair = /(\w+)=("(?:[^"\\]|\\.)*"|\S+)/g;
    for (const line of server.log.filter(Boolean)) {
      expect(line.replace(pair, "").trim(), line).toBe("");
    }
    expect(server.log[0]).toMatch(
      /^time=\S+ event=start version=\S+ runtime=node\/\S+ mode=greet name=mail\.example\.org/,
    );
  });

  it("in process: an option given as undefined takes its default (no option hides one)", async () => {
    const server = await serve({
      hostname: NAME,
      listen: [{ host: "127.0.0.1", port: 0 }],
      mode: undefined,
      maxCommands: undefined,
      timeoutMs: undefined,
      maxDurationMs: undefined,
      log: undefined,
    });
    try {
      // greet mode's limit of 20 lines: the 20th is answered, then the close.
      const got = await talk(server.addresses[0].port, "NOOP\r\n".repeat(25));
      expect(got.text).toBe(greeting(NAME).repeat(21));
      expect(got.ending).not.toBe("timeout");
    } finally {
      await server.close(0);
    }
  });

  it("in process: each session line has the time its session ended, and close() hands on every line first", async () => {
    const logged: {
      event: string;
      at?: number;
      called: number;
      fields: Readonly<Record<string, string | number>>;
    }[] = [];
    const server = await serve({
      hostname: NAME,
      listen: [{ host: "127.0.0.1", port: 0 }],
      log: (event, fields, at) => logged.push({ event, fields, at, called: Date.now() }),
    });
    const { port } = server.addresses[0];
    const windows: [number, number][] = [];
    for (const pause of [0, 60]) { // the second session ends after the first one's batch would have gone out
      await new Promise((resolve) => setTimeout(resolve, pause));
      const begun = Date.now();
      expect((await talk(port, "QUIT\r\n")).ending).toBe("fin");
      windows.push([begun, Date.now()]);
    }
    await server.close(0); // at once: the second line is still waiting for its batch
    const sessions = logged.filter((entry) => entry.event === "session");
    expect(sessions).toHaveLength(2);
    for (const [i, { at, called, fields }] of sessions.entries()) {
      const [begun, ended] = windows[i];
      const what = `session ${
        i + 1
      }: begun ${begun}, ended ${ended}, at ${at}, handed on ${called}`;
      expect(at, what).toBeGreaterThanOrEqual(begun);
      expect(at, what).toBeLessThanOrEqual(called);
      expect(fields).toMatchObject({ local_port: port, lines: 1, end: "quit" });
      expect(fields.duration_ms, what).toBeLessThanOrEqual(at! - begun); // the session began after we connected
      if (i === 0) {
        // The first line waited for its batch (the second was handed on by close()). A line timed when it
        // is handed on is at least the batch's 50 ms late; a line timed when its session ended is either
        // handed on at once (within 20 ms of the client's close) or carries a time at least 45 ms before
        // it is handed on (a timer never fires early; 45 allows for clock rounding). A busy machine can
        // delay the server's close and the batch alike, but not the 50 ms between them.
        expect(at! <= ended + 20 || called - at! >= 45, what).toBe(true);
      }
    }
  });

  it("--log off: no session lines", () => {
    const got = spawnSync(RUNTIMES.node[0], [FILE, "--stdio", "--log", "off", "--hostname", NAME], {
      input: "QUIT\r\n",
      encoding: "latin1",
    });
    expect(got).toMatchObject({ status: 0, stderr: "", stdout: greeting(NAME) + CLOSING });
  });
});

describe("signals", () => {
  it.each(ALL)(
    "on %s, SIGTERM: stops accepting, lets an open session finish, then exits 0",
    async (runtime) => {
      const server = await start(runtime, ["--hostname", NAME, "--drain", "2"]);
      // A session opened (and greeted) before the signal, which never ends by itself.
      const open = connect({ host: "127.0.0.1", port: server.port }).on("error", () => {});
      let text = "";
      open.on("data", (chunk) => (text += chunk.toString("latin1")));
      const closed = new Promise((resolve) => open.on("close", resolve));
      await until(() => text !== "", 15_000, "the greeting");
      const begun = Date.now();
      server.child.kill("SIGTERM");
      await until(
        () => !listening(server.port) || server.child.exitCode !== null,
        15_000,
        "the listener to close",
      );
      const late = await talk(server.port, "QUIT\r\n");
      expect(late).toMatchObject({ text: "", ending: "reset" }); // refused: no longer listening
      expect(server.child.exitCode).toBe(null); // still draining the open session
      // The open session ends at the drain deadline (2 s: never early), with end=shutdown. The upper
      // bound only tells the deadline from the session's own 300 s time-out: 12 s leaves a busy
      // machine 10 s of lateness.
      expect(await within(server.exited, 15_000, "the exit")).toBe(0);
      await within(closed, 5000, "the server to close the open session");
      expect(text).toBe(greeting(NAME));
      expect(Date.now() - begun).toBeGreaterThanOrEqual(1900);
      expect(Date.now() - begun).toBeLessThan(12_000);
      expect(server.log.some((l) => l.endsWith("end=shutdown"))).toBe(true);
      expect(server.log.some((l) => /event=stop signal=SIGTERM sessions=1 shutdown=1$/.test(l)))
        .toBe(true);
    },
  );

  it.each(ALL)(
    "on %s, a second SIGTERM ends the drain at once: exit 0, with the stop line",
    async (runtime) => {
      // A drain far longer than the test: exiting within it means the second signal ended it.
      const server = await start(runtime, ["--hostname", NAME, "--drain", "120"]);
      const open = connect({ host: "127.0.0.1", port: server.port }).on("error", () => {});
      await within(new Promise((resolve) => open.once("data", resolve)), 15_000, "the greeting");
      server.child.kill("SIGTERM");
      await until(() => !listening(server.port), 15_000, "the listener to close");
      server.child.kill("SIGTERM");
      expect(await within(server.exited, 20_000, "the exit, long before the 120 s drain")).toBe(0);
      expect(server.log.some((l) => /event=stop signal=SIGTERM sessions=1 shutdown=1$/.test(l)))
        .toBe(true);
    },
  );

  it("SIGTERM with a session that ends by itself during the drain: exits as soon as it has", async () => {
    // A drain far longer than the test: exiting within it means the server saw the session end.
    const server = await start("node", ["--hostname", NAME, "--drain", "120"]);
    const socket = connect({ host: "127.0.0.1", port: server.port }).on("error", () => {});
    await within(new Promise((resolve) => socket.once("data", resolve)), 15_000, "the greeting");
    server.child.kill("SIGTERM");
    await until(() => !listening(server.port), 15_000, "the listener to close"); // the signal is being handled
    socket.end("QUIT\r\n");
    expect(await within(server.exited, 20_000, "the exit, long before the 120 s drain")).toBe(0);
    expect(server.log.some((l) => /event=stop signal=SIGTERM sessions=1 quit=1$/.test(l))).toBe(
      true,
    );
  });

  it("SIGINT exits 0; SIGHUP is logged and ignored", async () => {
    const server = await start("node", ["--hostname", NAME]);
    server.child.kill("SIGHUP");
    await server.waitFor(/event=signal signal=SIGHUP action=ignored/);
    expect((await talk(server.port, "QUIT\r\n")).text).toBe(greeting(NAME) + CLOSING);
    expect(await server.stop("SIGINT")).toBe(0);
    expect(server.log.some((l) => l.includes("event=stop signal=SIGINT"))).toBe(true);
  });
});

describe("examples", () => {
  const units = readdirSync(EXAMPLES).filter((f) => /\.(service|socket)$/.test(f)).sort();

  it("every file the README names exists, and the README names every file in examples/", () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    // In backquotes, a relative path: with a directory, or a file name with an extension.
    const named = new Set(
      [...readme.matchAll(/`([\w.@-]+(?:\/[\w.@-]+)*)`/g)].map((m) => m[1])
        .filter((name) =>
          name.includes("/") || /\.(ts|md|json|service|socket|smtp521)$/.test(name)
        ),
    );
    expect(named.size).toBeGreaterThan(5); // the pattern found the README's files
    // The Deploying table names the examples by their place in examples/.
    const missing = [...named].filter((name) =>
      !existsSync(join(ROOT, name)) && !existsSync(join(EXAMPLES, name))
    );
    expect(missing, "named in README.md, but no such file").toEqual([]);
    const examples = (readdirSync(EXAMPLES, { recursive: true }) as string[])
      .filter((name) => statSync(join(EXAMPLES, name)).isFile());
    expect(examples.length).toBeGreaterThanOrEqual(units.length + 1);
    const unnamed = examples.filter((name) =>
      !named.has(name) && !named.has(relative(ROOT, join(EXAMPLES, name)))
    );
    expect(unnamed, "in examples/, but not named in README.md").toEqual([]);
  });

  it.skipIf(noAnalyze).each(units)(
    unless("%s passes systemd-analyze verify (with this machine's paths)", noAnalyze),
    (unit) => {
      const dir = mkdtempSync(join(tmpdir(), "smtp521-units-"));
      try {
        for (const name of units) {
          const text = readFileSync(join(EXAMPLES, name), "utf8")
            .replaceAll("/usr/local/bin/deno", join(BIN, "deno"))
            .replaceAll("/usr/bin/node", join(BIN, "node"))
            .replaceAll("/usr/local/lib/smtp521/smtp521.ts", FILE);
          writeFileSync(join(dir, name), text);
        }
        const got = spawnSync("systemd-analyze", ["verify", "--man=no", join(dir, unit)], {
          encoding: "utf8",
        });
        expect(got.stderr).toBe("");
        expect(got.status).toBe(0);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );

  it("the Deno unit's --allow-net list is enough to serve, and nothing more is asked", async () => {
    const exec =
      /^ExecStart=(.*)$/m.exec(readFileSync(join(EXAMPLES, "smtp521-deno.service"), "utf8"))![1];
    const allow = /--allow-net=(\S+)/.exec(exec)![1];
    const port = await freePort();
    const flags = allow.replaceAll(":25", `:${port}`);
    const server = spawn(join(BIN, "deno"), [
      "run",
      `--allow-net=${flags}`,
      "--no-prompt",
      FILE,
      "--port",
      String(port),
    ], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    server.stderr!.on("data", (chunk) => (stderr += chunk));
    try {
      await until(
        () => stderr.includes("event=start") || server.exitCode !== null,
        20_000,
        "the start line",
      );
      expect((await talk(port, "QUIT\r\n")).text).toMatch(/^521 .*\r\n221 /);
      expect(stderr).not.toMatch(/NotCapable|PermissionDenied|error/);
    } finally {
      server.kill("SIGTERM");
    }
  });

  it.skipIf(noTcpserver).each(ALL)(
    unless("the runit run script's tcpserver line serves on %s", noTcpserver),
    async (runtime) => {
      const port = await freePort();
      const line = /exec (tcpserver .*?)$/ms.exec(
        readFileSync(join(EXAMPLES, "runit", "run"), "utf8").replace(/\\\n\s*/g, " "),
      )![1];
      const words = line.split(/\s+/).filter((w) => w !== "setuidgid" && w !== "nobody"); // daemontools' setuidgid is not here
      const at = words.findIndex((w, i) => w === "0" && words[i + 1] === "25");
      words.splice(at, 2, "127.0.0.1", String(port)); // "0 25": every address, port 25
      const script = words.findIndex((w) => w.endsWith("smtp521.ts"));
      const [command, ...pre] = RUNTIMES[runtime];
      const argv = [...words.slice(0, script - 1), command, ...pre, ...words.slice(script + 1)];
      const { got, stderr } = await launch(argv, port, "NOOP\r\nQUIT\r\n");
      expect(got.text).toBe(greeting(NAME).repeat(2) + CLOSING);
      // The peer comes from the socket (Node, Deno) or from tcpserver's TCPREMOTEIP (Bun).
      expect(stderr).toMatch(
        new RegExp(
          `event=session remote=127\\.0\\.0\\.1:\\d+ local_port=${port} .* lines=2 end=quit`,
        ),
      );
    },
  );

  it.skipIf(noXinetd)(unless("the xinetd entry serves", noXinetd), async () => {
    const port = await freePort();
    const dir = mkdtempSync(join(tmpdir(), "smtp521-xinetd-"));
    // The entry runs the server as nobody, who may not reach the checkout (a private clone): run copies.
    const copy = forAnyUser();
    try {
      const entry = readFileSync(join(EXAMPLES, "xinetd.smtp521"), "utf8")
        .replace("service smtp", "service smtp521-test")
        .replace("{", `{\n\ttype = UNLISTED\n\tport = ${port}\n\tbind = 127.0.0.1`)
        .replace("/usr/bin/node", copy.node)
        .replace("/usr/local/lib/smtp521/smtp521.ts", copy.file);
      expect(entry).toContain(copy.file);
      writeFileSync(join(dir, "xinetd.conf"), entry);
      const { got } = await launch(
        ["xinetd", "-dontfork", "-f", join(dir, "xinetd.conf"), "-pidfile", join(dir, "pid")],
        port,
        "EHLO client.example\r\nQUIT\r\n",
        { logged: null }, // xinetd keeps the server's stderr
      );
      expect(got.text).toBe(greeting(NAME).repeat(2) + CLOSING);
    } finally {
      copy.remove();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
