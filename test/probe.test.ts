// The probe verb (SPEC §7), run as the real file on Node 24, Deno (--allow-net
// --no-prompt only) and Bun: against smtp521 itself in each mode, and against
// stub servers in this process that accept mail, greet 421, never greet, or
// close the port. Every connection goes to 127.0.0.1 or ::1; every wait is bounded.

import { createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { run, type Runtime, RUNTIMES, start } from "./helpers.ts";

const NAME = "mx.example";

/** Run `smtp521.ts probe ...args` on a runtime; the exit code, both outputs and the time it took. */
async function probe(runtime: Runtime, args: string[]) {
  const [command, ...pre] = RUNTIMES[runtime];
  const begun = Date.now();
  const result = await run(command, [...pre, "probe", ...args], { timeout: 15_000 });
  return { ...result, ms: Date.now() - begun };
}

interface Report {
  mode: string;
  name: string | null;
  greeting: string | null;
  quit: string | null;
  verdict: string;
  exit: number;
  transcript: { ms: number; dir: "sent" | "received" | "event"; text: string }[];
}

async function probeJson(runtime: Runtime, args: string[]) {
  const result = await probe(runtime, [...args, "--json"]);
  const report = JSON.parse(result.stdout) as Report;
  const sent = report.transcript.filter((line) => line.dir === "sent").map((line) => line.text);
  return { ...result, report, sent };
}

const stops: (() => void)[] = [];
afterEach(() => stops.splice(0).forEach((stop) => stop()));

/**
 * A stub SMTP server in this process: `greeting` on connect (none if null),
 * then `answer(line)` for each line ("" for no reply), closing after QUIT.
 */
async function stub(greeting: string | null, answer: (line: string) => string = () => "") {
  const heard: string[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    if (greeting !== null) socket.write(greeting);
    let partial = "";
    socket.setEncoding("latin1").on("data", (text: string) => {
      const lines = (partial + text).split("\r\n");
      partial = lines.pop()!;
      for (const line of lines) {
        heard.push(line);
        const reply = answer(line);
        if (reply) socket.write(reply);
        if (/^QUIT$/i.test(line)) socket.end();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  stops.push(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return { port, heard };
}

/** A port that was just free: listen on port 0, then close. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A well-behaved MTA: it takes every recipient. */
const accepting = (line: string) =>
  /^EHLO /i.test(line)
    ? "250-stub.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n"
    : /^QUIT$/i.test(line)
    ? "221 stub.example bye\r\n"
    : "250 OK\r\n";

describe.each(Object.keys(RUNTIMES) as Runtime[])("probe on %s", (runtime) => {
  describe("against smtp521", () => {
    it("greet mode: 521 to NOOP, 221 to QUIT: exit 0, with what senders do", async () => {
      const server = await start(runtime, ["--hostname", NAME]);
      try {
        const { code, stdout, stderr } = await probe(runtime, [`127.0.0.1:${server.port}`]);
        expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
        expect(stdout).toContain(`greeting: 521 ${NAME} does not accept mail\n`);
        expect(stdout).toContain("mode:     greet\n");
        expect(stdout).toContain(`name:     ${NAME}\n`);
        expect(stdout).toContain(`quit:     221 ${NAME} closing connection\n`);
        expect(stdout).toMatch(/senders: .*Exim.*bounce at once.*Postfix.*queue for days: consider --mode rcpt/);
        expect(stdout).toMatch(/verdict: +refuses mail per RFC 1846/);
        await server.waitFor(/lines=2 end=quit$/);
      } finally {
        await server.stop();
      }
    });

    it("close mode: the server closes after the greeting: exit 0, no QUIT to send", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "close"]);
      try {
        const { code, report } = await probeJson(runtime, [`127.0.0.1:${server.port}`]);
        expect(code).toBe(0);
        expect(report).toMatchObject({ mode: "close", name: NAME, quit: null, exit: 0 });
        expect(report.transcript.at(-1)).toMatchObject({ dir: "event" });
      } finally {
        await server.stop();
      }
    });

    it("rcpt mode: EHLO, MAIL FROM:<>, RCPT to postmaster@<name>, QUIT, never DATA: exit 0", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt"]);
      try {
        const { code, report, sent } = await probeJson(runtime, [`127.0.0.1:${server.port}`]);
        expect(code).toBe(0);
        expect(sent).toEqual(["EHLO [127.0.0.1]", "MAIL FROM:<>", `RCPT TO:<postmaster@${NAME}>`, "QUIT"]);
        expect(report).toMatchObject({ mode: "rcpt", name: NAME, quit: `221 ${NAME} closing connection`, exit: 0 });
        expect(report.transcript).toContainEqual(
          expect.objectContaining({ dir: "received", text: `521 ${NAME} does not accept mail` }),
        );
        const times = report.transcript.map((line) => line.ms);
        expect(times).toEqual([...times].sort((a, b) => a - b));
      } finally {
        await server.stop();
      }
    });

    it("rcpt mode with --rcpt-code 556 (RFC 7504): exit 0", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt", "--rcpt-code", "556"]);
      try {
        const { code, stdout } = await probe(runtime, [`127.0.0.1:${server.port}`, "--rcpt", "user@nomail.example"]);
        expect(code).toBe(0);
        expect(stdout).toContain('"556 nomail.example does not accept mail" to RCPT TO:<user@nomail.example>');
      } finally {
        await server.stop();
      }
    });

    it("a relay with --domains: 550 to postmaster@<name> says to pass --rcpt (exit 1); --rcpt then passes", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt", "--domains", "nomail.example"]);
      try {
        const hint = await probe(runtime, [`127.0.0.1:${server.port}`]);
        expect(hint.code).toBe(1);
        expect(hint.stdout).toMatch(/verdict: .*550: not a domain this relay refuses for: pass --rcpt/);
        const given = await probe(runtime, [`127.0.0.1:${server.port}`, "--rcpt", "u@NoMail.Example"]);
        expect(given.code).toBe(0);
      } finally {
        await server.stop();
      }
    });

    it("over IPv6, with an address literal as the name: RCPT to postmaster@[IPv6:::1]", async () => {
      const server = await start(runtime, ["--listen", "[::1]:0", "--mode", "rcpt", "--hostname", "[IPv6:::1]"]);
      try {
        const port = /listen=\[::1\]:(\d+)/.exec(await server.waitFor(/event=start /))![1];
        const { code, sent } = await probeJson(runtime, [`[::1]:${port}`]);
        expect(code).toBe(0);
        expect(sent).toEqual(["EHLO [IPv6:::1]", "MAIL FROM:<>", "RCPT TO:<postmaster@[IPv6:::1]>", "QUIT"]);
      } finally {
        await server.stop();
      }
    });
  });

  describe("against other servers", () => {
    it("an MTA that accepts every recipient: exit 1, and still no DATA, then QUIT", async () => {
      const mta = await stub("220 stub.example ESMTP\r\n", accepting);
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${mta.port}`]);
      expect(code).toBe(1);
      expect(stdout).toContain("mode:     none\n");
      expect(stdout).toMatch(/verdict: .*accepted the recipient <postmaster@stub\.example>/);
      expect(mta.heard).toEqual(["EHLO [127.0.0.1]", "MAIL FROM:<>", "RCPT TO:<postmaster@stub.example>", "QUIT"]);
    });

    it("a 421 greeting: exit 1, senders queue", async () => {
      const busy = await stub("421 stub.example busy, try later\r\n", () => "221 stub.example bye\r\n");
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${busy.port}`]);
      expect(code).toBe(1);
      expect(stdout).toMatch(/verdict: .*greets "421 stub\.example busy, try later"/);
      expect(stdout).toMatch(/senders: .*queue/);
      expect(busy.heard).toEqual(["QUIT"]);
    });

    it("falls back to HELO when EHLO gets a 5xx, and reads multi-line replies", async () => {
      const old = await stub(
        "220-stub.example\r\n220 old-style relay\r\n",
        (line) =>
          /^EHLO/.test(line)
            ? "500 what?\r\n"
            : /^RCPT/.test(line)
            ? "521 nomail.example does not accept mail\r\n"
            : /^QUIT/.test(line)
            ? "221 bye\r\n"
            : "250 OK\r\n",
      );
      const { code, report, sent } = await probeJson(runtime, [`127.0.0.1:${old.port}`, "--rcpt", "u@nomail.example"]);
      expect(code).toBe(0);
      expect(report).toMatchObject({ mode: "rcpt", name: "stub.example", greeting: "220-stub.example" });
      expect(sent).toEqual([
        "EHLO [127.0.0.1]",
        "HELO [127.0.0.1]",
        "MAIL FROM:<>",
        "RCPT TO:<u@nomail.example>",
        "QUIT",
      ]);
    });

    it("a 521 greeting whose QUIT gets no 221: exit 1", async () => {
      const rude = await stub("521 stub.example no mail\r\n", () => "521 stub.example no mail\r\n");
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${rude.port}`]);
      expect(code).toBe(1);
      expect(stdout).toMatch(/verdict: .*QUIT got "521 stub\.example no mail", not 221/);
    });

    it("a server that is not SMTP: exit 1", async () => {
      const ssh = await stub("SSH-2.0-OpenSSH_9.2\r\n");
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${ssh.port}`]);
      expect(code).toBe(1);
      expect(stdout).toMatch(/verdict: .*the greeting is not an SMTP reply/);
      expect(ssh.heard).toEqual([]);
    });

    it("terminal escapes in replies never reach stdout", async () => {
      const evil = await stub(
        "521 evil.example \x1b]0;owned\x07 does not accept mail\r\n",
        (line) => line === "QUIT" ? "221 bye\x1b[2J\r\n" : "521 evil.example \x1b[31mno\r\n",
      );
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${evil.port}`]);
      expect(code).toBe(0);
      expect(stdout).toContain("greeting: 521 evil.example ?]0;owned? does not accept mail\n");
      expect(stdout).toMatch(/^[\x20-\x7e\n]+$/);
    });

    it("a closed port: exit 3", async () => {
      const port = await closedPort();
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${port}`]);
      expect(code).toBe(3);
      expect(stdout).toMatch(/verdict: +cannot be reached: ECONNREFUSED/);
    });

    it("a listener that never greets, --timeout 1: exit 3 within 2 s", async () => {
      const silent = await stub(null);
      const { code, stdout, ms } = await probe(runtime, [`127.0.0.1:${silent.port}`, "--timeout", "1"]);
      expect(code).toBe(3);
      expect(stdout).toMatch(/verdict: +no greeting: no reply within --timeout/);
      expect(ms).toBeLessThan(2000);
      expect(silent.heard).toEqual([]);
    });
  });

  it("--help prints the usage, exit 0", async () => {
    const { code, stdout } = await probe(runtime, ["--help"]);
    expect(code).toBe(0);
    expect(stdout).toMatch(/probe HOST\[:PORT\]/);
  });

  it.each([
    [[], /^smtp521: probe: give one HOST\[:PORT\]/],
    [["a.example", "b.example"], /^smtp521: probe: give one HOST\[:PORT\]/],
    [["127.0.0.1:0"], /^smtp521: probe: "127\.0\.0\.1:0" is not HOST\[:PORT\]/],
    [["[::1]:65536"], /^smtp521: probe: "\[::1\]:65536" is not HOST\[:PORT\]/],
    [["127.0.0.1", "--bogus"], /^smtp521: --bogus: unknown flag/],
    [["127.0.0.1", "--rcpt", "no-at-sign"], /^smtp521: --rcpt: "no-at-sign" is not USER@DOMAIN/],
    [["127.0.0.1", "--rcpt", "a b@x.example"], /^smtp521: --rcpt: /],
    [["127.0.0.1", "--timeout", "soon"], /^smtp521: --timeout: "soon" must be seconds/],
    [["127.0.0.1", "--rcpt"], /^smtp521: --rcpt: needs a value/],
  ])("usage error %j: one line on stderr naming it, exit 2, nothing on stdout", async (args, line) => {
    const { code, stdout, stderr } = await probe(runtime, args);
    expect({ code, stdout }).toEqual({ code: 2, stdout: "" });
    expect(stderr).toMatch(line);
    expect(stderr.trimEnd().split("\n")).toHaveLength(1);
  });
});
