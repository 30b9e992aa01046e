// probe.ts, run as the real file on Node 24, Deno (--allow-net --no-prompt only)
// and Bun. The host check: against smtp521 itself in each mode, and against
// stub servers in this process that accept mail, greet 421, never greet, answer
// slowly, send control characters, or close the port. The domain check: against
// a DNS server stub in this process (MX, A, AAAA, NXDOMAIN, SERVFAIL, silence)
// whose records point at smtp521 instances and stubs. Every socket is on
// 127.0.0.1 or ::1; every wait and loop is bounded.

import { createSocket } from "node:dgram";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { BIN, ROOT, run, type Runtime, RUNTIMES, start } from "./helpers.ts";

const NAME = "mx.example";
const DOMAIN = "nomail.example";
const FILE = join(ROOT, "probe.ts");
const PROBE = {
  node: [join(BIN, "node"), FILE],
  deno: [join(BIN, "deno"), "run", "--allow-net", "--no-prompt", FILE],
  bun: [join(BIN, "bun"), FILE],
} as const;

/** Run `probe.ts ...args` on a runtime; the exit code, both outputs and the time it took. */
async function probe(runtime: Runtime, args: string[]) {
  const [command, ...pre] = PROBE[runtime];
  const begun = Date.now();
  const result = await run(command, [...pre, ...args], { timeout: 15_000 });
  return { ...result, ms: Date.now() - begun };
}

type Line = { ms: number; dir: "sent" | "received" | "event"; text: string };
interface Report {
  target: string;
  mode: string;
  name: string | null;
  greeting: string | null;
  quit: string | null;
  verdict: string;
  action: string;
  exit: number;
  transcript: Line[];
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
 * then `answer(line)` for each line ("" for no reply), each written `delay` ms
 * late, in latin1 (one byte a character), closing after QUIT.
 */
async function stub(
  greeting: string | null,
  answer: (line: string) => string = () => "",
  { host = "127.0.0.1", port = 0, delay = 0 } = {},
) {
  const heard: string[] = [];
  const sockets = new Set<Socket>();
  const timers = new Set<ReturnType<typeof setTimeout>>();
  let connections = 0;
  const later = (socket: Socket, text: string, then = () => {}) => {
    const send = () => {
      socket.write(text, "latin1");
      then();
    };
    if (!delay) return send();
    const timer = setTimeout(() => {
      timers.delete(timer);
      send();
    }, delay);
    timers.add(timer);
  };
  const server: Server = createServer((socket) => {
    connections++;
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    if (greeting !== null) later(socket, greeting);
    let partial = "";
    socket.setEncoding("latin1").on("data", (text: string) => {
      const lines = (partial + text).split("\r\n");
      partial = lines.pop()!;
      for (const line of lines) {
        heard.push(line);
        const quit = /^QUIT$/i.test(line);
        later(socket, answer(line), () => quit && socket.end());
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, resolve);
  });
  const bound = (server.address() as { port: number }).port;
  stops.push(() => {
    for (const timer of timers) clearTimeout(timer);
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return { port: bound, heard, connections: () => connections };
}

/** A port that was just free: listen on port 0, then close. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A port number free on both 127.0.0.1 and ::1 just now (at most 10 tries). */
async function freeOnBoth(): Promise<number> {
  for (let tries = 0; tries < 10; tries++) {
    const port = await closedPort();
    const v6 = createServer();
    const ok = await new Promise<boolean>((resolve) => {
      v6.once("error", () => resolve(false));
      v6.listen(port, "::1", () => resolve(true));
    });
    if (ok) {
      await new Promise((resolve) => v6.close(resolve));
      return port;
    }
  }
  throw new Error("no port free on both 127.0.0.1 and ::1 in 10 tries");
}

/** A well-behaved MTA: it takes every recipient. */
const accepting = (line: string) =>
  /^EHLO /i.test(line)
    ? "250-stub.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n"
    : /^QUIT$/i.test(line)
    ? "221 stub.example bye\r\n"
    : "250 OK\r\n";

// ---------------------------------------------------------------------------
// A DNS server stub: answers from `zone`, NXDOMAIN for names not in it.
// ---------------------------------------------------------------------------

interface Entry {
  MX?: [number, string][];
  A?: string[];
  AAAA?: string[];
  /** Answer every question about this name with this RCODE (2 SERVFAIL, 3 NXDOMAIN). */
  rcode?: number;
  /** Never answer questions about this name. */
  silent?: boolean;
}
const TYPES: Record<number, string> = { 1: "A", 15: "MX", 28: "AAAA" };

/** `name` in wire form; a name ending in the question's name ends in a pointer to it. */
function wireName(name: string, question: string): Buffer {
  const pointer = Buffer.from([0xc0, 12]);
  if (name === question) return pointer;
  const local = name.endsWith(`.${question}`) ? name.slice(0, -question.length - 1) : name;
  const label = (l: string) => Buffer.from([l.length, ...Buffer.from(l)]);
  const labels = local ? local.split(".").map(label) : [];
  return Buffer.concat([...labels, local === name ? Buffer.from([0]) : pointer]);
}

function rr(type: number, data: Buffer): Buffer {
  const head = Buffer.alloc(12);
  head.set([0xc0, 12]); // the owner: the question's name
  head.writeUInt16BE(type, 2);
  head.writeUInt16BE(1, 4);
  head.writeUInt32BE(300, 6);
  head.writeUInt16BE(data.length, 10);
  return Buffer.concat([head, data]);
}

function ipv6Bytes(text: string): Buffer {
  const [head, tail = ""] = text.split("::");
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const zeros = text.includes("::") ? 8 - left.length - right.length : 0;
  const groups = [...left, ...Array<string>(zeros).fill("0"), ...right];
  const bytes = Buffer.alloc(16);
  groups.forEach((g, i) => bytes.writeUInt16BE(parseInt(g, 16), i * 2));
  return bytes;
}

async function dnsStub(zone: Record<string, Entry>) {
  const asked: string[] = [];
  const socket = createSocket("udp4");
  socket.on("message", (query, from) => {
    let at = 12;
    const labels: string[] = [];
    for (let n = 0; n < 128 && query[at]; n++) {
      labels.push(query.toString("latin1", at + 1, at + 1 + query[at]));
      at += 1 + query[at];
    }
    const name = labels.join(".").toLowerCase();
    const type = query.readUInt16BE(at + 1);
    asked.push(`${TYPES[type] ?? type} ${name}`);
    const entry = zone[name];
    if (entry?.silent) return;
    const rcode = entry ? entry.rcode ?? 0 : 3;
    const answers: Buffer[] = [];
    if (rcode === 0 && TYPES[type] === "MX") {
      for (const [preference, exchange] of entry!.MX ?? []) {
        const pref = Buffer.alloc(2);
        pref.writeUInt16BE(preference);
        answers.push(rr(type, Buffer.concat([pref, wireName(exchange, name)])));
      }
    }
    if (rcode === 0 && TYPES[type] === "A") {
      for (const ip of entry!.A ?? []) {
        answers.push(rr(type, Buffer.from(ip.split(".").map(Number))));
      }
    }
    if (rcode === 0 && TYPES[type] === "AAAA") {
      for (const ip of entry!.AAAA ?? []) answers.push(rr(type, ipv6Bytes(ip)));
    }
    const header = Buffer.alloc(12);
    header.writeUInt16BE(query.readUInt16BE(0), 0);
    header.writeUInt16BE(0x8180 | rcode, 2); // QR, RD, RA
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(answers.length, 6);
    const reply = Buffer.concat([header, query.subarray(12, at + 5), ...answers]);
    socket.send(reply, from.port, from.address);
  });
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const port = socket.address().port;
  stops.push(() => socket.close());
  return { resolver: `127.0.0.1:${port}`, asked };
}

interface DomainPath {
  host: string;
  preference: number | null;
  target: string | null;
  action: string;
  verdict: string;
  exit: number;
  report: Report | null;
}
interface DomainReport {
  domain: string;
  routing: string;
  mx: { preference: number; exchange: string }[];
  verdict: string;
  exit: number;
  warnings: string[];
  paths: DomainPath[];
  lookups: { name: string; type: string; status: string }[];
}

/** `probe.ts --domain nomail.example --resolver <stub> --port <port>`, text and JSON. */
async function checkDomain(runtime: Runtime, resolver: string, port: number, more: string[] = []) {
  const args = ["--domain", DOMAIN, "--resolver", resolver, "--port", String(port), ...more];
  const text = await probe(runtime, args);
  const json = await probe(runtime, [...args, "--json"]);
  return { ...text, json: JSON.parse(json.stdout) as DomainReport, jsonCode: json.code };
}

describe.each(Object.keys(PROBE) as Runtime[])("probe.ts on %s", (runtime) => {
  describe("host check, against smtp521", () => {
    it("greet mode: 521 to NOOP, 221 to QUIT: exit 0, with what senders do", async () => {
      const server = await start(runtime, ["--hostname", NAME]);
      try {
        const { code, stdout, stderr } = await probe(runtime, [`127.0.0.1:${server.port}`]);
        expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
        expect(stdout).toContain(`greeting: 521 ${NAME} does not accept mail\n`);
        expect(stdout).toContain("mode:     greet\n");
        expect(stdout).toContain(`name:     ${NAME}\n`);
        expect(stdout).toContain(`quit:     221 ${NAME} closing connection\n`);
        expect(stdout).toMatch(
          /senders: .*Exim.*bounce at once.*Postfix.*queue for days: consider --mode rcpt/,
        );
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

    it("rcpt mode: EHLO, MAIL FROM:<>, RCPT to postmaster@<name>, QUIT, no DATA", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt"]);
      try {
        const { code, report, sent } = await probeJson(runtime, [`127.0.0.1:${server.port}`]);
        expect(code).toBe(0);
        expect(sent).toEqual([
          "EHLO [127.0.0.1]",
          "MAIL FROM:<>",
          `RCPT TO:<postmaster@${NAME}>`,
          "QUIT",
        ]);
        expect(report).toMatchObject({
          mode: "rcpt",
          name: NAME,
          quit: `221 ${NAME} closing connection`,
          action: "bounce",
          exit: 0,
        });
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
      const args = ["--hostname", NAME, "--mode", "rcpt", "--rcpt-code", "556"];
      const server = await start(runtime, args);
      try {
        const target = `127.0.0.1:${server.port}`;
        const { code, stdout } = await probe(runtime, [target, "--rcpt", "user@nomail.example"]);
        expect(code).toBe(0);
        expect(stdout).toContain(
          '"556 nomail.example does not accept mail" to RCPT TO:<user@nomail.example>',
        );
      } finally {
        await server.stop();
      }
    });

    it("a relay with --domains: 550 says to pass --rcpt (exit 1); --rcpt then passes", async () => {
      const args = ["--hostname", NAME, "--mode", "rcpt", "--domains", "nomail.example"];
      const server = await start(runtime, args);
      try {
        const hint = await probe(runtime, [`127.0.0.1:${server.port}`]);
        expect(hint.code).toBe(1);
        expect(hint.stdout).toMatch(/verdict: .*550: not a domain this relay refuses for: pass/);
        const target = `127.0.0.1:${server.port}`;
        const given = await probe(runtime, [target, "--rcpt", "u@NoMail.Example"]);
        expect(given.code).toBe(0);
      } finally {
        await server.stop();
      }
    });

    it("over IPv6, an address literal as the name: RCPT to postmaster@[IPv6:::1]", async () => {
      const args = ["--listen", "[::1]:0", "--mode", "rcpt", "--hostname", "[IPv6:::1]"];
      const server = await start(runtime, args);
      try {
        const port = /listen=\[::1\]:(\d+)/.exec(await server.waitFor(/event=start /))![1];
        const { code, sent } = await probeJson(runtime, [`[::1]:${port}`]);
        expect(code).toBe(0);
        expect(sent).toEqual([
          "EHLO [IPv6:::1]",
          "MAIL FROM:<>",
          "RCPT TO:<postmaster@[IPv6:::1]>",
          "QUIT",
        ]);
      } finally {
        await server.stop();
      }
    });
  });

  describe("host check, against other servers", () => {
    it("an MTA that accepts every recipient: exit 1, and still no DATA, then QUIT", async () => {
      const mta = await stub("220 stub.example ESMTP\r\n", accepting);
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${mta.port}`]);
      expect(code).toBe(1);
      expect(stdout).toContain("mode:     none\n");
      expect(stdout).toMatch(/verdict: .*accepted the recipient <postmaster@stub\.example>/);
      expect(mta.heard).toEqual([
        "EHLO [127.0.0.1]",
        "MAIL FROM:<>",
        "RCPT TO:<postmaster@stub.example>",
        "QUIT",
      ]);
    });

    it("a 421 greeting: exit 1, senders queue", async () => {
      const bye = () => "221 stub.example bye\r\n";
      const busy = await stub("421 stub.example busy, try later\r\n", bye);
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
      const args = [`127.0.0.1:${old.port}`, "--rcpt", "u@nomail.example"];
      const { code, report, sent } = await probeJson(runtime, args);
      expect(code).toBe(0);
      const greeting = "220-stub.example";
      expect(report).toMatchObject({ mode: "rcpt", name: "stub.example", greeting });
      expect(sent).toEqual([
        "EHLO [127.0.0.1]",
        "HELO [127.0.0.1]",
        "MAIL FROM:<>",
        "RCPT TO:<u@nomail.example>",
        "QUIT",
      ]);
    });

    it("a multi-line reply with two codes (521-, then 220) is not SMTP: exit 1", async () => {
      const mixed = await stub(
        "521-mixed.example no mail\r\n220 mixed.example ready\r\n",
        (line) => line === "QUIT" ? "221 bye\r\n" : "521 mixed.example no mail\r\n",
      );
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${mixed.port}`]);
      expect(code).toBe(1);
      expect(stdout).toMatch(/verdict: .*the greeting is not an SMTP reply/);
    });

    it("a 521 greeting whose QUIT gets no 221: exit 1", async () => {
      const rude = await stub("521 stub.example no mail\r\n", () => "521 stub.example no mail\r\n");
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${rude.port}`]);
      expect(code).toBe(1);
      expect(stdout).toMatch(/verdict: .*QUIT got "521 stub\.example no mail", not 221/);
    });

    it("a 521 greeting naming an IPv6 literal with a zone id names no host: exit 1", async () => {
      const zoned = await stub("521 [IPv6:fe80::1%eth0] no mail\r\n", () => "221 bye\r\n");
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${zoned.port}`]);
      expect(code).toBe(1);
      expect(stdout).toContain("name:     none\n");
      expect(stdout).toMatch(/verdict: .*the 521 greeting names no host/);
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

    it("C1 controls and DEL (an 8-bit CSI) are replaced in text and escaped in JSON", async () => {
      const greeting = "521 c1.example \x9b2J\x7f\x85 does not accept mail";
      const c1 = await stub(
        `${greeting}\r\n`,
        (line) => line === "QUIT" ? "221 bye\x9b0m\r\n" : "521 c1.example no\r\n",
      );
      const text = await probe(runtime, [`127.0.0.1:${c1.port}`]);
      expect(text.code).toBe(0);
      expect(text.stdout).toContain("greeting: 521 c1.example ?2J?? does not accept mail\n");
      expect(text.stdout).toMatch(/^[\x20-\x7e\n]+$/);
      const json = await probe(runtime, [`127.0.0.1:${c1.port}`, "--json"]);
      expect(json.stdout).toMatch(/^[\x20-\x7e\n]+$/);
      expect(json.stdout).toContain(String.raw`c1.example \u009b2J\u007f\u0085 does`);
      const report = JSON.parse(json.stdout) as Report;
      expect(report.greeting).toBe(greeting);
      expect(report.quit).toBe("221 bye\x9b0m");
    });

    it("a closed port: exit 3", async () => {
      const port = await closedPort();
      const { code, stdout } = await probe(runtime, [`127.0.0.1:${port}`]);
      expect(code).toBe(3);
      expect(stdout).toMatch(/verdict: +cannot be reached: ECONNREFUSED/);
    });

    it("a listener that never greets, --timeout 1: exit 3 within 2 s", async () => {
      const silent = await stub(null);
      const args = [`127.0.0.1:${silent.port}`, "--timeout", "1"];
      const { code, stdout, ms } = await probe(runtime, args);
      expect(code).toBe(3);
      expect(stdout).toMatch(/verdict: +no greeting: no reply within --timeout/);
      expect(ms).toBeLessThan(2000);
      expect(silent.heard).toEqual([]);
    });

    it("--timeout bounds the whole probe: replies 1.5 s late, --timeout 2: by 2 s", async () => {
      const slow = await stub(
        "220 slow.example ESMTP\r\n",
        (line) => /^RCPT/.test(line) ? "521 slow.example no\r\n" : accepting(line),
        { delay: 1500 },
      );
      const args = [`127.0.0.1:${slow.port}`, "--timeout", "2"];
      const { code, report, ms } = await probeJson(runtime, args);
      expect(code).toBe(1);
      expect(report.verdict).toMatch(/EHLO\/HELO got no reply within --timeout/);
      expect(report.transcript.at(-1)!.ms).toBeLessThan(2300);
      expect(ms).toBeLessThan(4000); // each read bounded alone: about 7.5 s
    });
  });

  it("--help prints both forms, exit 0", async () => {
    const { code, stdout } = await probe(runtime, ["--help"]);
    expect(code).toBe(0);
    expect(stdout).toMatch(/probe\.ts HOST\[:PORT\]/);
    expect(stdout).toMatch(/probe\.ts --domain NAME/);
  });

  it.each([
    [[], /^probe\.ts: give one HOST\[:PORT\] or --domain NAME/],
    [["a.example", "b.example"], /^probe\.ts: give one HOST\[:PORT\]/],
    [["127.0.0.1:0"], /^probe\.ts: "127\.0\.0\.1:0" is not HOST\[:PORT\]/],
    [["[::1]:65536"], /^probe\.ts: "\[::1\]:65536" is not HOST\[:PORT\]/],
    [["127.0.0.1", "--bogus"], /^probe\.ts: --bogus: unknown flag/],
    [["127.0.0.1", "--rcpt", "no-at-sign"], /^probe\.ts: --rcpt: "no-at-sign" is not USER@DOMAIN/],
    [["127.0.0.1", "--rcpt", "a b@x.example"], /^probe\.ts: --rcpt: /],
    [["127.0.0.1", "--rcpt", "u@[IPv6:fe80::1%eth0]"], /^probe\.ts: --rcpt: /],
    [["127.0.0.1", "--timeout", "soon"], /^probe\.ts: --timeout: "soon" must be seconds/],
    [["127.0.0.1", "--rcpt"], /^probe\.ts: --rcpt: needs a value/],
    [["127.0.0.1", "--port", "25"], /^probe\.ts: --port: only with --domain/],
    [["--domain", "no_such.example"], /^probe\.ts: --domain: "no_such\.example" is not a domain/],
    [["--domain", "[127.0.0.1]"], /^probe\.ts: --domain: "\[127\.0\.0\.1\]" is not a domain/],
    [["--domain", "a.example", "b.example"], /^probe\.ts: --domain: give no HOST too/],
    [["--domain", "a.example", "--port", "0"], /^probe\.ts: --port: "0" must be a whole number/],
    [["--domain", "a.example", "--resolver", "ns.example"], /^probe\.ts: --resolver: "ns\.ex/],
    [["--domain", "a.example", "--resolver", "fe80::1%lo"], /^probe\.ts: --resolver: /],
  ])("usage error %j: one line on stderr naming it, exit 2, no stdout", async (args, line) => {
    const { code, stdout, stderr } = await probe(runtime, args);
    expect({ code, stdout }).toEqual({ code: 2, stdout: "" });
    expect(stderr).toMatch(line);
    expect(stderr.trimEnd().split("\n")).toHaveLength(1);
  });

  describe("domain check", () => {
    it("a lone null MX: exit 0, and no connection is made", async () => {
      const target = await stub("220 stub.example ESMTP\r\n", accepting);
      const dns = await dnsStub({ [DOMAIN]: { MX: [[0, ""]], A: ["127.0.0.1"] } });
      const { code, stdout, json } = await checkDomain(runtime, dns.resolver, target.port);
      expect(code).toBe(0);
      expect(stdout.split("\n")[0]).toMatch(/^verdict: +refuses mail: a null MX \(RFC 7505/);
      expect(stdout).toContain("mx:       0 .\n");
      expect(json).toMatchObject({ routing: "null MX", exit: 0, paths: [] });
      expect(target.connections()).toBe(0);
      expect(dns.asked).toEqual([`MX ${DOMAIN}`, `MX ${DOMAIN}`]); // one per run: text, JSON
    });

    it("a null MX mixed with another MX: exit 1 (RFC 7505 section 3)", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt"]);
      try {
        const dns = await dnsStub({
          [DOMAIN]: { MX: [[0, ""], [10, `mx.${DOMAIN}`]] },
          [`mx.${DOMAIN}`]: { A: ["127.0.0.1"] },
        });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, server.port);
        expect(code).toBe(1);
        expect(stdout).toMatch(/^verdict: .*null MX mixed with other MX records \(RFC 7505 sec/);
        expect(json.routing).toBe("null MX mixed");
        expect(json.paths).toMatchObject([{ host: `mx.${DOMAIN}`, action: "bounce", exit: 0 }]);
      } finally {
        await server.stop();
      }
    });

    it("MX to smtp521 in rcpt mode: RCPT to postmaster@<domain> gets 521: exit 0", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--mode", "rcpt"]);
      try {
        const dns = await dnsStub({
          [DOMAIN]: { MX: [[10, `mx.${DOMAIN}`]] },
          [`mx.${DOMAIN}`]: { A: ["127.0.0.1"] },
        });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, server.port);
        expect(code).toBe(0);
        expect(stdout.split("\n")[0]).toMatch(/^verdict: +refuses mail: every path .*bounce at/);
        const path = `bounce now +mx\\.${DOMAIN} 127\\.0\\.0\\.1:${server.port} rcpt mode`;
        expect(stdout).toMatch(new RegExp(path));
        const mx = [{ preference: 10, exchange: `mx.${DOMAIN}` }];
        expect(json).toMatchObject({ routing: "MX", mx });
        expect(json.paths).toHaveLength(1);
        expect(json.paths[0].report!.transcript).toContainEqual(
          expect.objectContaining({ dir: "sent", text: `RCPT TO:<postmaster@${DOMAIN}>` }),
        );
      } finally {
        await server.stop();
      }
    });

    it("MX to smtp521 in greet mode: exit 0, warns that Postfix and OpenSMTPD queue", async () => {
      const server = await start(runtime, ["--hostname", NAME]);
      try {
        const dns = await dnsStub({
          [DOMAIN]: { MX: [[10, `mx.${DOMAIN}`]] },
          [`mx.${DOMAIN}`]: { A: ["127.0.0.1"] },
        });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, server.port);
        expect(code).toBe(0);
        expect(stdout).toMatch(/^warning: +Postfix and OpenSMTPD will queue/m);
        expect(json.paths).toMatchObject([{ action: "bounce-or-queue", exit: 0 }]);
        expect(json.warnings).toHaveLength(1);
      } finally {
        await server.stop();
      }
    });

    it("two MX, one of which accepts mail: exit 1", async () => {
      const port = await freeOnBoth();
      const mta = await stub("220 stub.example ESMTP\r\n", accepting, { host: "::1", port });
      const server = await start(runtime, ["--hostname", NAME, "--listen", `127.0.0.1:${port}`]);
      try {
        const dns = await dnsStub({
          [DOMAIN]: { MX: [[20, `mx2.${DOMAIN}`], [10, `mx1.${DOMAIN}`]] },
          [`mx1.${DOMAIN}`]: { A: ["127.0.0.1"] },
          [`mx2.${DOMAIN}`]: { AAAA: ["::1"] },
        });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, port);
        expect(code).toBe(1);
        expect(stdout).toMatch(/^verdict: +does NOT refuse mail on every path: 1 of 2 paths/);
        expect(stdout).toMatch(new RegExp(`deliver +mx2\\.${DOMAIN} \\[::1\\]:${port}`));
        expect(json.paths.map((p) => [p.host, p.action, p.exit])).toEqual([
          [`mx1.${DOMAIN}`, "bounce-or-queue", 0],
          [`mx2.${DOMAIN}`, "deliver", 1],
        ]);
        expect(mta.heard).toContain(`RCPT TO:<postmaster@${DOMAIN}>`);
      } finally {
        await server.stop();
      }
    });

    it("no MX, and the domain's own A record answers 521 (the implicit MX): exit 0", async () => {
      const server = await start(runtime, ["--hostname", DOMAIN, "--mode", "rcpt"]);
      try {
        const dns = await dnsStub({ [DOMAIN]: { A: ["127.0.0.1"] } });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, server.port);
        expect(code).toBe(0);
        expect(stdout).toContain("mx:       none: the implicit MX");
        expect(json).toMatchObject({ routing: "implicit MX", mx: [] });
        expect(json.paths).toMatchObject([{ host: DOMAIN, preference: null, action: "bounce" }]);
        expect(dns.asked).toContain(`AAAA ${DOMAIN}`);
      } finally {
        await server.stop();
      }
    });

    it("an MX host on 127.0.0.1 and ::1, ::1 down: exit 1 (who reaches it queues)", async () => {
      const server = await start(runtime, ["--hostname", NAME, "--listen", "127.0.0.1:0"]);
      try {
        const dns = await dnsStub({
          [DOMAIN]: { MX: [[10, `mx.${DOMAIN}`]] },
          [`mx.${DOMAIN}`]: { A: ["127.0.0.1"], AAAA: ["::1"] },
        });
        const { code, stdout, json } = await checkDomain(runtime, dns.resolver, server.port);
        expect(code).toBe(1);
        expect(stdout).toMatch(/^verdict: .*1 of 2 paths cannot be reached: senders there queue/);
        expect(stdout).toMatch(
          new RegExp(`queue for days +mx\\.${DOMAIN} \\[::1\\]:${server.port}: cannot be reached`),
        );
        expect(json.paths.map((p) => [p.target, p.exit])).toEqual([
          [`127.0.0.1:${server.port}`, 0],
          [`[::1]:${server.port}`, 3],
        ]);
      } finally {
        await server.stop();
      }
    });

    it("every address down: exit 3", async () => {
      const port = await closedPort();
      const dns = await dnsStub({ [DOMAIN]: { A: ["127.0.0.1"] } });
      const { code, stdout } = await checkDomain(runtime, dns.resolver, port);
      expect(code).toBe(3);
      expect(stdout).toMatch(/^verdict: +cannot tell: no host can be reached/);
    });

    it("SERVFAIL for the MX lookup: exit 3, reported as such", async () => {
      const dns = await dnsStub({ [DOMAIN]: { rcode: 2 } });
      const { code, stdout, json } = await checkDomain(runtime, dns.resolver, 25);
      expect(code).toBe(3);
      expect(stdout).toMatch(/^verdict: +the MX lookup failed: SERVFAIL \(exit 3\)/);
      expect(json.lookups).toMatchObject([{ name: DOMAIN, type: "MX", status: "SERVFAIL" }]);
    });

    it("NXDOMAIN: exit 3, reported as such", async () => {
      const dns = await dnsStub({});
      const { code, stdout } = await checkDomain(runtime, dns.resolver, 25);
      expect(code).toBe(3);
      expect(stdout).toMatch(/^verdict: +nomail\.example does not exist \(NXDOMAIN\)/);
    });

    it("SERVFAIL for an MX host's addresses: exit 3", async () => {
      const dns = await dnsStub({
        [DOMAIN]: { MX: [[10, `mx.${DOMAIN}`]] },
        [`mx.${DOMAIN}`]: { rcode: 2 },
      });
      const { code, stdout } = await checkDomain(runtime, dns.resolver, 25);
      expect(code).toBe(3);
      expect(stdout).toMatch(/the A lookup for mx\.nomail\.example failed: SERVFAIL/);
    });

    it("a resolver that never answers, --timeout 1: exit 3 within the time-out", async () => {
      const dns = await dnsStub({ [DOMAIN]: { silent: true } });
      const args = ["--domain", DOMAIN, "--resolver", dns.resolver, "--timeout", "1"];
      const { code, stdout, ms } = await probe(runtime, args);
      expect(code).toBe(3);
      expect(stdout).toMatch(/^verdict: +the MX lookup failed: time-out/);
      expect(ms).toBeLessThan(3500); // the runtime's start-up, then 1 s
      expect(dns.asked.length).toBeGreaterThanOrEqual(2); // sent again within the time-out
      expect(dns.asked.length).toBeLessThanOrEqual(3);
    });
  });
});

// Deno alone asks before it reads a file; Node and Bun read /etc/resolv.conf.
describe("probe.ts on deno, with --allow-net alone", () => {
  it("--domain without --resolver: exit 2 naming --resolver, no prompt", async () => {
    const { code, stdout, stderr } = await probe("deno", ["--domain", DOMAIN]);
    expect({ code, stdout }).toEqual({ code: 2, stdout: "" });
    expect(stderr).toMatch(/^probe\.ts: --domain: Deno may not read \/etc\/resolv\.conf .*--res/);
  });
});

// The server file holds no client code: its old probe verb points here.
describe("smtp521.ts probe", () => {
  it.each(["node", "deno", "bun"] as const)(
    "on %s exits 2 with one line pointing to probe.ts",
    async (runtime) => {
      const [command, ...args] = RUNTIMES[runtime];
      const got = await run(command, [...args, "probe", "mx.example"]);
      expect(got).toMatchObject({ code: 2, stdout: "" });
      expect(got.stderr).toMatch(/^smtp521: probe: .*probe\.ts.*\n$/);
      expect(got.stderr.trimEnd().split("\n")).toHaveLength(1);
    },
  );
});
