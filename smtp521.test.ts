// Tests for smtp521.ts: the session core with no network, then the real file
// on Node 24, Deno (--allow-net --no-prompt only) and Bun over real sockets,
// then real clients (Python smtplib, curl, nodemailer). Every connection goes
// to 127.0.0.1 or ::1, and every loop is bounded in count and time.

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import nodemailer from "nodemailer";
import { describe, expect, it } from "vitest";
import { createSession, MAX_LINE, parseOptions, type SessionConfig, type Step, USAGE, VERSION } from "./smtp521.ts";

const ROOT = dirname(fileURLToPath(import.meta.url));
const FILE = join(ROOT, "smtp521.ts");
const BIN = join(ROOT, "node_modules", ".bin");

// ---------------------------------------------------------------------------
// The session core, with no network.
// ---------------------------------------------------------------------------

const NAME = "mx.example";
const REFUSE = `521 ${NAME} does not accept mail\r\n`;
const CLOSING = `221 ${NAME} closing connection\r\n`;

function session(overrides: Partial<SessionConfig> = {}) {
  return createSession({ mode: "greet", name: NAME, maxCommands: 20, rcptCode: 521, domains: null, ...overrides });
}

const bytes = (text: string) => new TextEncoder().encode(text);

/** Feed chunks in order; collect everything sent, the lines taken and the end. */
function feed(s: ReturnType<typeof session>, ...chunks: (string | Uint8Array)[]) {
  const steps: Step[] = chunks.map((chunk) => s.receive(typeof chunk === "string" ? bytes(chunk) : chunk));
  return {
    send: steps.map((step) => step.send).join(""),
    lines: steps.reduce((n, step) => n + step.lines, 0),
    end: steps.find((step) => step.end)?.end ?? null,
    steps,
  };
}

describe("session core: greet mode (RFC 1846 §4.2 b)", () => {
  it("greets with 521 as soon as the session starts, before reading anything", () => {
    expect(session().greeting).toEqual({ send: REFUSE, lines: 0, end: null });
  });

  it("answers every line with the 521, with CRLF or bare LF", () => {
    const got = feed(session(), "EHLO client.example\r\n", "MAIL FROM:<a@b.example>\n", "\r\n", "NOOP\n");
    expect(got).toMatchObject({ send: REFUSE.repeat(4), lines: 4, end: null });
  });

  it("answers several lines in one chunk once each, in order", () => {
    const got = feed(session(), "EHLO a\r\nRCPT TO:<x@y>\r\nDATA\r\nQUIT\r\n");
    expect(got).toMatchObject({ send: REFUSE.repeat(3) + CLOSING, lines: 4, end: "quit" });
  });

  it("waits for the end of a line split over many chunks", () => {
    const s = session();
    const parts = [..."NOOP an argument\r"].map((c) => feed(s, c));
    expect(parts.every((p) => p.send === "" && p.lines === 0 && p.end === null)).toBe(true);
    expect(feed(s, "\n")).toMatchObject({ send: REFUSE, lines: 1, end: null });
  });

  it.each(["QUIT", "quit", "Quit  ", "qUiT\t \t"])("answers %j with 221 and closes", (line) => {
    expect(feed(session(), `${line}\r\n`)).toMatchObject({ send: CLOSING, lines: 1, end: "quit" });
  });

  it.each(["QUITX", "QU\0IT", " QUIT", "QUIT now", "QUIT\r"])("takes %j for a command other than QUIT", (line) => {
    expect(feed(session(), `${line}\r\n`)).toMatchObject({ send: REFUSE, lines: 1, end: null });
  });

  it("ignores every byte after QUIT", () => {
    const s = session();
    expect(feed(s, "QUIT\r\nNOOP\r\nNOOP\r\n")).toMatchObject({ send: CLOSING, lines: 1, end: "quit" });
    expect(feed(s, "NOOP\r\n", "QUIT\r\n")).toMatchObject({ send: "", lines: 0, end: null });
  });

  it("accepts a line of exactly 1000 octets with its CRLF", () => {
    expect(feed(session(), "N".repeat(MAX_LINE - 2) + "\r\n")).toMatchObject({ send: REFUSE, lines: 1, end: null });
  });

  it("answers a line of 1001 octets once and closes, in one chunk or split", () => {
    expect(feed(session(), "N".repeat(MAX_LINE - 1) + "\r\n")).toMatchObject({ send: REFUSE, end: "too-long" });
    const s = session();
    expect(feed(s, "N".repeat(MAX_LINE - 1))).toMatchObject({ send: "", end: null });
    expect(feed(s, "N")).toMatchObject({ send: REFUSE, lines: 0, end: "too-long" });
  });

  it("closes as soon as 1000 octets without an end of line are held: it never buffers more", () => {
    const s = session();
    const got = feed(s, "EHLO x\r\n" + "A".repeat(600), "B".repeat(399), "C");
    expect(got.steps.map((step) => step.end)).toEqual([null, null, "too-long"]);
    expect(got.send).toBe(REFUSE + REFUSE);
    expect(feed(s, "D".repeat(100_000) + "\r\n")).toMatchObject({ send: "", lines: 0, end: null });
  });

  it("answers the last of --max-commands lines, then closes", () => {
    const s = session({ maxCommands: 3 });
    expect(feed(s, "NOOP\r\nNOOP\r\n")).toMatchObject({ send: REFUSE.repeat(2), end: null });
    expect(feed(s, "NOOP\r\nNOOP\r\n")).toMatchObject({ send: REFUSE, lines: 1, end: "limit" });
  });

  it("lets QUIT win over the command limit", () => {
    expect(feed(session({ maxCommands: 1 }), "QUIT\r\n")).toMatchObject({ send: CLOSING, end: "quit" });
  });

  it.each([
    ["GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    ["POST /login HTTP/1.0\r\n"],
    ["CONNECT mx.example:25 HTTP/1.1\r\n"],
    ["PRI * HTTP/2.0\r\n"],
  ])("closes without a reply on an HTTP request line: %j", (text) => {
    expect(feed(session(), text)).toMatchObject({ send: "", end: "forbidden" });
  });

  it("closes without a reply on a TLS ClientHello", () => {
    const hello = new Uint8Array([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]);
    expect(feed(session(), hello)).toMatchObject({ send: "", lines: 0, end: "forbidden" });
  });

  it("treats an HTTP-looking line after the first as an ordinary line", () => {
    expect(feed(session(), "NOOP\r\nGET / HTTP/1.1\r\n")).toMatchObject({ send: REFUSE.repeat(2), end: null });
  });
});

describe("session core: close mode (RFC 1846 §4.2 a)", () => {
  it("greets with 521 and ends at once", () => {
    const s = session({ mode: "close" });
    expect(s.greeting).toEqual({ send: REFUSE, lines: 0, end: "closed" });
    expect(feed(s, "EHLO x\r\nQUIT\r\n")).toMatchObject({ send: "", lines: 0, end: null });
  });
});

// ---------------------------------------------------------------------------
// Options.
// ---------------------------------------------------------------------------

describe("options", () => {
  it("has the documented defaults", () => {
    expect(parseOptions([])).toMatchObject({
      mode: "greet",
      listen: [{ host: "", port: 25 }],
      maxCommands: 20,
      maxConnections: 1000,
      maxPerIp: 10,
      timeoutMs: 300_000,
      drainMs: 5000,
      rcptCode: 521,
      domains: null,
      logFormat: "text",
    });
  });

  it.each([
    ["--listen", "192.0.2.1:25", { host: "192.0.2.1", port: 25 }],
    ["--listen", "[::1]:2525", { host: "::1", port: 2525 }],
    ["--listen", ":25", { host: "", port: 25 }],
    ["--listen", "fd:3", { fd: 3 }],
    ["--port", "0", { host: "", port: 0 }],
  ])("reads %s %s", (flag, value, where) => {
    expect(parseOptions([flag, value])).toMatchObject({ listen: [where] });
  });

  it("lower-cases --hostname and accepts address literals", () => {
    expect(parseOptions(["--hostname", "NTP1.Example.ORG."])).toMatchObject({ hostname: "ntp1.example.org" });
    expect(parseOptions(["--hostname", "[192.0.2.1]"])).toMatchObject({ hostname: "[192.0.2.1]" });
    expect(parseOptions(["--hostname", "[IPv6:2001:DB8::1]"])).toMatchObject({ hostname: "[IPv6:2001:db8::1]" });
  });

  it.each([
    [["--hostname", "bad name"], "--hostname"],
    [["--hostname", "a_b.example"], "--hostname"],
    [["--hostname", "x".repeat(254)], "--hostname"],
    [["--hostname", "[300.1.1.1]"], "--hostname"],
    [["--mode", "bounce"], "--mode"],
    [["--max-commands", "0"], "--max-commands"],
    [["--max-commands", "1001"], "--max-commands"],
    [["--timeout", "-1"], "--timeout"],
    [["--listen", "example.org:25"], "--listen"],
    [["--listen", "127.0.0.1:70000"], "--listen"],
    [["--log", "xml"], "--log"],
    [["--frobnicate"], "--frobnicate"],
    [["--mode"], "--mode"],
  ])("rejects %j naming %s", (args, flag) => {
    const result = parseOptions(args);
    expect(result).toHaveProperty("error");
    expect((result as { error: string }).error.startsWith(flag)).toBe(true);
  });
});

// ---------------------------------------------------------------------------
// The real file, spawned on each runtime.
// ---------------------------------------------------------------------------

const RUNTIMES = {
  node: [join(BIN, "node"), FILE],
  deno: [join(BIN, "deno"), "run", "--allow-net", "--no-prompt", FILE],
  bun: [join(BIN, "bun"), FILE],
} as const;
type Runtime = keyof typeof RUNTIMES;

interface Running {
  readonly child: ChildProcess;
  readonly port: number;
  /** Every stderr line so far. */
  readonly log: string[];
  /** Wait for a stderr line matching `pattern`. */
  waitFor(pattern: RegExp, ms?: number): Promise<string>;
  /** Send a signal and wait for the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Spawn the real file with `--port 0` (unless listening elsewhere) and read the port from its start line. */
async function start(runtime: Runtime, args: string[] = []): Promise<Running> {
  const [command, ...pre] = RUNTIMES[runtime];
  const listen = args.some((a) => a === "--listen" || a === "--port") ? [] : ["--port", "0"];
  const child = spawn(command, [...pre, ...listen, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  const log: string[] = [];
  const waiters = new Set<() => void>();
  let partial = "";
  child.stderr!.setEncoding("utf8").on("data", (text: string) => {
    const lines = (partial + text).split("\n");
    partial = lines.pop()!;
    log.push(...lines);
    for (const wake of waiters) wake();
  });
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  function waitFor(pattern: RegExp, ms = 10_000): Promise<string> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const line = log.find((l) => pattern.test(l));
        if (line === undefined) return;
        waiters.delete(check);
        clearTimeout(timer);
        resolve(line);
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`no stderr line ${pattern} in ${ms} ms; got:\n${log.join("\n")}`));
      }, ms);
      waiters.add(check);
      check();
    });
  }
  const startLine = await waitFor(/event=start /);
  const port = Number(/listen=\S*?:(\d+)/.exec(startLine)![1]);
  return {
    child,
    port,
    log,
    waitFor,
    stop: (signal = "SIGTERM") => {
      if (child.exitCode === null) child.kill(signal);
      return exited;
    },
  };
}

interface Talk {
  /** Everything the server sent. */
  readonly text: string;
  /** How it ended: the server's FIN, a reset, or our own time-out. */
  readonly ending: "fin" | "reset" | "timeout";
  readonly ms: number;
}

/**
 * Connect, optionally wait for the greeting, write `send`, and read until
 * the server closes (bounded by `ms`).
 */
function talk(
  port: number,
  send: string | Uint8Array = "",
  { host = "127.0.0.1", ms = 5000, afterGreeting = true } = {},
): Promise<Talk> {
  return new Promise((resolve) => {
    const begun = Date.now();
    const socket = connect({ host, port });
    let text = "";
    let sent = false;
    const done = (ending: Talk["ending"]) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ text, ending, ms: Date.now() - begun });
    };
    const timer = setTimeout(() => done("timeout"), ms);
    const write = () => {
      if (sent) return;
      sent = true;
      if (send.length) socket.write(send);
    };
    socket.on("connect", () => afterGreeting || write());
    socket.on("data", (chunk) => {
      text += chunk.toString("latin1");
      if (afterGreeting) write();
    });
    socket.on("end", () => done("fin"));
    socket.on("error", () => done("reset"));
  });
}

const run = (command: string, args: string[], options: { input?: string; timeout?: number } = {}) =>
  new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = execFile(command, args, { timeout: options.timeout ?? 20_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
      resolve({ code, stdout, stderr });
    });
    child.stdin!.end(options.input ?? "");
  });

const greeting = (name: string) => `521 ${name} does not accept mail\r\n`;

describe.each(Object.keys(RUNTIMES) as Runtime[])("the real file on %s", (runtime) => {
  it("greets 521 before reading, answers every command 521 and QUIT 221, then sends FIN", async () => {
    const server = await start(runtime, ["--hostname", "ntp1.example.org"]);
    try {
      const got = await talk(
        server.port,
        "EHLO client.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@ntp1.example.org>\r\nDATA\r\nNOOP\r\nQUIT\r\n",
      );
      const refuse = greeting("ntp1.example.org");
      expect(got.text).toBe(refuse.repeat(6) + "221 ntp1.example.org closing connection\r\n");
      expect(got.ending).toBe("fin");
      const line = await server.waitFor(/event=session /);
      expect(line).toMatch(/ remote=127\.0\.0\.1:\d+ local_port=\d+ mode=greet duration_ms=\d+ lines=6 end=quit$/);
      expect(line).toContain(`local_port=${server.port}`);
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });

  it("names itself by the local address literal when no FQDN is known: IPv4 and IPv6", async () => {
    const server = await start(runtime);
    try {
      expect(server.log.find((l) => l.includes("event=start"))).toContain("name_source=local-address");
      expect((await talk(server.port, "QUIT\r\n")).text).toMatch(/^521 \[127\.0\.0\.1\] does not accept mail\r\n221 /);
      const v6 = await talk(server.port, "QUIT\r\n", { host: "::1" });
      expect(v6.text).toMatch(/^521 \[IPv6:::1\] does not accept mail\r\n221 \[IPv6:::1\] closing connection\r\n$/);
    } finally {
      await server.stop();
    }
  });

  it("close mode: the client reads the 521 and a FIN even when it wrote before the greeting", async () => {
    const server = await start(runtime, ["--mode", "close", "--hostname", "ntp1.example.org"]);
    try {
      const early = "EHLO client.example\r\n".repeat(2000); // 42 KB the server never answers
      const got = await talk(server.port, early, { afterGreeting: false });
      expect(got).toMatchObject({ text: greeting("ntp1.example.org"), ending: "fin" });
      expect(await server.waitFor(/event=session .* end=closed$/)).toMatch(/lines=0/);
    } finally {
      await server.stop();
    }
  });

  it("closes an idle session at the time-out, without a reply", async () => {
    const server = await start(runtime, ["--timeout", "0.5", "--hostname", "ntp1.example.org"]);
    try {
      const got = await talk(server.port, "NOOP\r\n");
      expect(got.text).toBe(greeting("ntp1.example.org").repeat(2));
      expect(got.ending).toBe("fin");
      expect(got.ms).toBeGreaterThanOrEqual(450);
      expect(got.ms).toBeLessThan(3000);
      await server.waitFor(/event=session .* lines=1 end=timeout$/);
    } finally {
      await server.stop();
    }
  });

  it("answers a 1001-octet line once with the 521 and closes", async () => {
    const server = await start(runtime, ["--hostname", "ntp1.example.org"]);
    try {
      const got = await talk(server.port, "N".repeat(999) + "\r\nNOOP\r\n");
      expect(got).toMatchObject({ text: greeting("ntp1.example.org").repeat(2), ending: "fin" });
      await server.waitFor(/event=session .* lines=0 end=too-long$/);
    } finally {
      await server.stop();
    }
  });

  it("exits 0 on SIGTERM with a summary line", async () => {
    const server = await start(runtime);
    await talk(server.port, "QUIT\r\n");
    await server.waitFor(/event=session /);
    expect(await server.stop("SIGTERM")).toBe(0);
    expect(server.log.some((l) => /event=stop signal=SIGTERM sessions=1 quit=1$/.test(l))).toBe(true);
  });
});

// ---------------------------------------------------------------------------
// Real clients (INTEROP.md).
// ---------------------------------------------------------------------------

describe("real clients against a 521 greeting", () => {
  it("Python smtplib raises SMTPConnectError with code 521", async () => {
    const server = await start("node", ["--hostname", "ntp1.example.org"]);
    try {
      const script = [
        "import smtplib, sys",
        "try:",
        `    smtplib.SMTP('127.0.0.1', ${server.port}, timeout=5)`,
        "except smtplib.SMTPConnectError as e:",
        "    print(e.smtp_code, e.smtp_error.decode())",
      ].join("\n");
      const got = await run("python3", ["-c", script]);
      expect(got.stdout.trim()).toBe("521 ntp1.example.org does not accept mail");
    } finally {
      await server.stop();
    }
  });

  it("curl's smtp:// exits 8", async () => {
    const server = await start("node", ["--hostname", "ntp1.example.org"]);
    try {
      const url = `smtp://127.0.0.1:${server.port}`;
      const args = ["-sS", url, "--mail-from", "a@client.example", "--mail-rcpt", "b@ntp1.example.org", "-T", "-"];
      const got = await run("curl", args, { input: "Subject: hi\r\n\r\nhello\r\n" });
      expect(got.code).toBe(8);
      expect(got.stderr).toContain("521");
    } finally {
      await server.stop();
    }
  });

  it("nodemailer fails with EPROTOCOL and responseCode 521", async () => {
    const server = await start("node", ["--hostname", "ntp1.example.org"]);
    try {
      const transport = nodemailer.createTransport({ host: "127.0.0.1", port: server.port, secure: false });
      const sent = transport.sendMail({ from: "a@client.example", to: "b@ntp1.example.org", text: "hello" });
      await expect(sent).rejects.toMatchObject({ code: "EPROTOCOL", responseCode: 521, command: "CONN" });
    } finally {
      await server.stop();
    }
  });
});

// ---------------------------------------------------------------------------
// The command line (SPEC §6).
// ---------------------------------------------------------------------------

describe("the command line", () => {
  const node = RUNTIMES.node;

  it("--help exits 0 and lists every flag with its default", async () => {
    const got = await run(node[0], [FILE, "--help"]);
    expect(got.code).toBe(0);
    expect(got.stdout).toBe(USAGE);
    for (const flag of ["mode", "hostname", "listen", "port", "stdio", "domains", "rcpt-code", "max-commands"]) {
      expect(got.stdout).toContain(`--${flag}`);
    }
    for (const flag of ["max-connections", "max-per-ip", "timeout", "drain", "user", "log", "help", "version"]) {
      expect(got.stdout).toContain(`--${flag}`);
    }
    for (const value of ["default greet", "default 521", "default 20", "default 1000", "default 10", "default 300"]) {
      expect(got.stdout).toContain(`(${value})`);
    }
  });

  it("--version prints the package version", async () => {
    const got = await run(node[0], [FILE, "--version"]);
    const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
    expect(got).toMatchObject({ code: 0, stdout: `smtp521 ${pkg.version}\n` });
    expect(VERSION).toBe(pkg.version);
  });

  it.each([
    [["--frobnicate"], /^smtp521: --frobnicate: unknown flag; see --help\n$/],
    [["--mode", "bounce"], /^smtp521: --mode: "bounce" is not one of greet, close, rcpt\n$/],
    [["--hostname", "<script>"], /^smtp521: --hostname: .* is not a domain name or address literal/],
    [["--max-per-ip", "ten"], /^smtp521: --max-per-ip: "ten" must be a whole number/],
  ])("%j exits 2 with one line naming the flag", async (args, message) => {
    const got = await run(node[0], [FILE, ...args]);
    expect(got.code).toBe(2);
    expect(got.stderr).toMatch(message);
    expect(got.stderr.trimEnd().split("\n")).toHaveLength(1);
  });

  it("a port in use exits 1 with the cause and the fix", async () => {
    const holder = createServer().listen(0, "127.0.0.1");
    await new Promise((resolve) => holder.once("listening", resolve));
    const port = (holder.address() as { port: number }).port;
    try {
      const got = await run(node[0], [FILE, "--listen", `127.0.0.1:${port}`]);
      expect(got.code).toBe(1);
      expect(got.stderr).toMatch(
        new RegExp(`^smtp521: cannot listen on 127\\.0\\.0\\.1:${port}: EADDRINUSE; .*--listen\\n$`),
      );
    } finally {
      holder.close();
    }
  });

  it("port 25 without the privilege exits 1 naming root, CAP_NET_BIND_SERVICE and a higher port", async () => {
    const unprivileged = Number(readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8")) > 25;
    const root = process.getuid?.() === 0;
    if (!unprivileged) return console.warn("skipped: this kernel lets anyone bind port 25");
    // As root, run the file as nobody; otherwise this user already lacks the privilege.
    const [command, args] = root
      ? ["setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", node[0], FILE, "--port", "25"]]
      : [node[0], [FILE, "--port", "25"]];
    const got = await run(command, args);
    expect(got.code).toBe(1);
    expect(got.stderr).toMatch(
      /^smtp521: cannot listen on \[::\]:25: EACCES; .*root.*CAP_NET_BIND_SERVICE.*port above 1023\n$/,
    );
  });
});

// A client of the helpers above, so a broken helper cannot pass silently.
describe("test helpers", () => {
  it("talk() reports a reset as a reset, not a FIN", async () => {
    const server = createServer((socket: Socket) => socket.resetAndDestroy());
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as { port: number }).port;
    try {
      expect((await talk(port, "", { afterGreeting: false })).ending).toBe("reset");
    } finally {
      server.close();
    }
  });
});
