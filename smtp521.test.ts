// Tests for smtp521.ts: the session core with no network, then the real file
// on Node 24, Deno (--allow-net --no-prompt only) and Bun over real sockets,
// then real clients (Python smtplib, curl, nodemailer). Every connection goes
// to 127.0.0.1 or ::1, and every loop is bounded in count and time.

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import fc from "fast-check";
import nodemailer from "nodemailer";
import { describe, expect, it } from "vitest";
import {
  FILE,
  forAnyUser,
  greeting,
  isRoot,
  ROOT,
  run,
  type Runtime,
  RUNTIMES,
  start,
  talk,
  unless,
  within,
} from "./test/helpers.ts";
import {
  checkedDomain,
  createSession,
  type DomainList,
  formatLine,
  MAX_LINE,
  overloadSession,
  parseDomainList,
  parseOptions,
  receive,
  repliesFor,
  type SessionConfig,
  type Step,
  VERSION,
} from "./smtp521.ts";

// ---------------------------------------------------------------------------
// The session core, with no network.
// ---------------------------------------------------------------------------

const NAME = "mx.example";
const REFUSE = `521 ${NAME} does not accept mail\r\n`;
const CLOSING = `221 ${NAME} closing connection\r\n`;

function session(overrides: Partial<SessionConfig> = {}) {
  return createSession({
    mode: "greet",
    name: NAME,
    maxCommands: 20,
    rcptCode: 521,
    domains: null,
    ...overrides,
  });
}

const bytes = (text: string) => new TextEncoder().encode(text);

/** Feed chunks in order; collect everything sent, the lines taken and the end. */
function feed(s: ReturnType<typeof session>, ...chunks: (string | Uint8Array)[]) {
  const steps: Step[] = chunks.map((chunk) =>
    receive(s, typeof chunk === "string" ? bytes(chunk) : chunk)
  );
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
    const got = feed(
      session(),
      "EHLO client.example\r\n",
      "MAIL FROM:<a@b.example>\n",
      "\r\n",
      "NOOP\n",
    );
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

  it("trims at most 64 trailing blanks: a longer run is not a command, and costs no scan", () => {
    const blanks = (n: number) => " \t".repeat(n).slice(0, n);
    expect(feed(session(), `QUIT${blanks(64)}\r\n`)).toMatchObject({ send: CLOSING, end: "quit" });
    expect(feed(session(), `QUIT${blanks(65)}\r\n`)).toMatchObject({ send: REFUSE, end: null });
    expect(feed(session(), `QUIT${blanks(990)}\r\n`)).toMatchObject({ send: REFUSE, end: null });
  });

  it.each(["QUITX", "QU\0IT", " QUIT", "QUIT now", "QUIT\r"])(
    "takes %j for a command other than QUIT",
    (line) => {
      expect(feed(session(), `${line}\r\n`)).toMatchObject({ send: REFUSE, lines: 1, end: null });
    },
  );

  it("ignores every byte after QUIT", () => {
    const s = session();
    expect(feed(s, "QUIT\r\nNOOP\r\nNOOP\r\n")).toMatchObject({
      send: CLOSING,
      lines: 1,
      end: "quit",
    });
    expect(feed(s, "NOOP\r\n", "QUIT\r\n")).toMatchObject({ send: "", lines: 0, end: null });
  });

  it("accepts a line of exactly 1000 octets with its CRLF", () => {
    expect(feed(session(), "N".repeat(MAX_LINE - 2) + "\r\n")).toMatchObject({
      send: REFUSE,
      lines: 1,
      end: null,
    });
  });

  it("answers a line of 1001 octets once and closes, in one chunk or split", () => {
    expect(feed(session(), "N".repeat(MAX_LINE - 1) + "\r\n")).toMatchObject({
      send: REFUSE,
      end: "too-long",
    });
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
    expect(feed(session({ maxCommands: 1 }), "QUIT\r\n")).toMatchObject({
      send: CLOSING,
      end: "quit",
    });
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
    const hello = new Uint8Array([
      0x16,
      0x03,
      0x01,
      0x00,
      0xa5,
      0x01,
      0x00,
      0x00,
      0xa1,
      0x03,
      0x03,
    ]);
    expect(feed(session(), hello)).toMatchObject({ send: "", lines: 0, end: "forbidden" });
  });

  it("treats an HTTP-looking line after the first as an ordinary line", () => {
    expect(feed(session(), "NOOP\r\nGET / HTTP/1.1\r\n")).toMatchObject({
      send: REFUSE.repeat(2),
      end: null,
    });
  });
});

describe("session core: close mode (RFC 1846 §4.2 a)", () => {
  it("greets with 521 and ends at once", () => {
    const s = session({ mode: "close" });
    expect(s.greeting).toEqual({ send: REFUSE, lines: 0, end: "closed" });
    expect(feed(s, "EHLO x\r\nQUIT\r\n")).toMatchObject({ send: "", lines: 0, end: null });
  });
});

describe("session core: rcpt mode (RFC 1846 §3)", () => {
  const HELLO = `250 ${NAME}\r\n`;
  const OK = "250 OK\r\n";
  const rcpt = (overrides: Partial<SessionConfig> = {}) => session({ mode: "rcpt", ...overrides });
  /** Each line's reply, one by one. */
  const dialog = (s: ReturnType<typeof session>, ...lines: string[]) =>
    lines.map((line) => receive(s, bytes(`${line}\r\n`)).send);

  it("greets 220 and takes HELO/EHLO with a single-line 250 (no extensions)", () => {
    const s = rcpt();
    expect(s.greeting).toEqual({
      send: `220 ${NAME} ESMTP refuses all mail\r\n`,
      lines: 0,
      end: null,
    });
    expect(dialog(s, "EHLO client.example", "HELO client.example", "EHLO", "helo")).toEqual([
      HELLO,
      HELLO,
      "501 syntax error in parameters or arguments\r\n",
      "501 syntax error in parameters or arguments\r\n",
    ]);
  });

  it("refuses every RCPT with 521 naming the checked, lower-cased domain", () => {
    const s = rcpt();
    expect(
      dialog(
        s,
        "EHLO c",
        "MAIL FROM:<a@client.example>",
        "RCPT TO:<u@X.Example.>",
        "RCPT TO:<v@y.example> NOTIFY=NEVER",
      ),
    )
      .toEqual([
        HELLO,
        OK,
        "521 x.example does not accept mail\r\n",
        "521 y.example does not accept mail\r\n",
      ]);
  });

  it("answers 556 with --rcpt-code 556 (RFC 7504)", () => {
    expect(dialog(rcpt({ rcptCode: 556 }), "MAIL FROM:<>", "RCPT TO:<u@x.example>"))
      .toEqual([OK, "556 x.example does not accept mail\r\n"]);
  });

  it("names itself, not the client's text, when the domain is not well formed", () => {
    const s = rcpt();
    dialog(s, "MAIL FROM:<>");
    for (
      const to of [
        "u@exa_mple.com",
        "u@-x.example",
        "u@a..b",
        `u@${"a".repeat(64)}.example`,
        "u@[1.2.3]",
        "u@[IPv6:1.2.3.4]",
      ]
    ) {
      expect(dialog(s, `RCPT TO:<${to}>`)).toEqual([`521 ${NAME} does not accept mail\r\n`]);
    }
    expect(dialog(s, "RCPT TO:<Postmaster>", "RCPT TO:<postmaster>")).toEqual([REFUSE, REFUSE]);
  });

  it("judges a source-routed recipient by its final domain, and address literals as literals", () => {
    const s = rcpt();
    expect(
      dialog(
        s,
        "MAIL FROM:<>",
        "RCPT TO:<@relay.example,@r2.example:user@Final.Example>",
        "RCPT TO:<u@[192.0.2.1]>",
      ),
    )
      .toEqual([
        OK,
        "521 final.example does not accept mail\r\n",
        "521 [192.0.2.1] does not accept mail\r\n",
      ]);
    expect(dialog(s, "RCPT TO:<u@[IPv6:2001:DB8::1]>")).toEqual([
      "521 [IPv6:2001:db8::1] does not accept mail\r\n",
    ]);
  });

  it("refuses listed domains with 521 and all others with 550: never an open relay", () => {
    const domains = parseDomainList("a.example,.b.example,[192.0.2.1]") as DomainList;
    const s = rcpt({ domains });
    dialog(s, "MAIL FROM:<>");
    const to = (address: string) => dialog(s, `RCPT TO:<${address}>`)[0];
    expect(to("u@a.example")).toBe("521 a.example does not accept mail\r\n");
    expect(to("u@A.EXAMPLE.")).toBe("521 a.example does not accept mail\r\n");
    expect(to("u@x.b.example")).toBe("521 x.b.example does not accept mail\r\n");
    expect(to("u@deep.x.B.example")).toBe("521 deep.x.b.example does not accept mail\r\n");
    expect(to("u@[192.0.2.1]")).toBe("521 [192.0.2.1] does not accept mail\r\n");
    for (
      const other of [
        "u@b.example",
        "u@x.a.example",
        "u@a.example.org",
        "u@other.example",
        "u@[192.0.2.2]",
        "u@bad_name",
      ]
    ) {
      expect(to(other)).toBe("550 relaying denied\r\n");
    }
  });

  it("checks the order of commands: 503 for RCPT and DATA before MAIL, and for a second MAIL", () => {
    const s = rcpt();
    expect(
      dialog(
        s,
        "RCPT TO:<u@x.example>",
        "DATA",
        "MAIL FROM:<a@b.example>",
        "MAIL FROM:<a@b.example>",
      ),
    ).toEqual([
      "503 bad sequence of commands\r\n",
      "503 bad sequence of commands\r\n",
      OK,
      "503 bad sequence of commands\r\n",
    ]);
  });

  it("answers DATA after MAIL with 554, never 354", () => {
    const s = rcpt();
    expect(dialog(s, "MAIL FROM:<a@b.example>", "RCPT TO:<u@x.example>", "DATA")).toEqual([
      OK,
      "521 x.example does not accept mail\r\n",
      "554 no valid recipients\r\n",
    ]);
    expect(dialog(s, "Subject: hello", ".")).toEqual([
      "500 command not recognized\r\n",
      "500 command not recognized\r\n",
    ]);
  });

  it("resets the transaction on RSET and on a new EHLO", () => {
    const s = rcpt();
    expect(dialog(s, "MAIL FROM:<>", "RSET", "RCPT TO:<u@x.example>")).toEqual([
      OK,
      OK,
      "503 bad sequence of commands\r\n",
    ]);
    expect(dialog(s, "MAIL FROM:<>", "EHLO c", "DATA")).toEqual([
      OK,
      HELLO,
      "503 bad sequence of commands\r\n",
    ]);
  });

  it.each([
    ["MAIL FROM:a@b.example"],
    ["MAIL TO:<a@b.example>"],
    ["MAIL FROM:<a b@c>"],
    ["MAIL FROM:<<a@b>>"],
    ["MAIL"],
  ])("answers a malformed %j with 501", (line) => {
    expect(dialog(rcpt(), line)).toEqual(["501 syntax error in parameters or arguments\r\n"]);
  });

  it.each([["RCPT TO:u@x.example"], ["RCPT FROM:<u@x.example>"], ["RCPT TO:<>"], [
    "RCPT TO:<@relay.example>",
  ], [
    "RCPT TO:<nobody>",
  ], ["RCPT TO:<u@é.example>"]])("answers a malformed %j after MAIL with 501", (line) => {
    expect(dialog(rcpt(), "MAIL FROM:<>", line)[1]).toBe(
      "501 syntax error in parameters or arguments\r\n",
    );
  });

  it("answers RSET and NOOP with 250, and QUIT with 221 and the end", () => {
    const s = rcpt();
    expect(dialog(s, "RSET", "NOOP", "noop anything")).toEqual([OK, OK, OK]);
    expect(feed(s, "QUIT \r\nNOOP\r\n")).toMatchObject({ send: CLOSING, lines: 1, end: "quit" });
  });

  it("takes RSET with up to 64 trailing blanks; with more, the argument is a syntax error", () => {
    const syntax = "501 syntax error in parameters or arguments\r\n";
    expect(dialog(rcpt(), `RSET${" ".repeat(64)}`, `RSET${" ".repeat(100)}`)).toEqual([OK, syntax]);
  });

  it.each([
    "VRFY postmaster",
    "EXPN staff",
    "HELP",
    "STARTTLS",
    "AUTH PLAIN AGFiYwBwdw==",
    "BDAT 10 LAST",
    "ETRN x",
    "TURN",
    "SEND FROM:<a@b>",
    "SOML FROM:<a@b>",
    "SAML FROM:<a@b>",
  ])(
    "answers %j with 502",
    (line) => expect(dialog(rcpt(), line)).toEqual(["502 command not implemented\r\n"]),
  );

  it.each(["XYZZY", "", "   ", "MAIL-FROM:<a@b>", "QU\0IT", "RCPT\tTO:<u@x.example>", "Ã©HLO x"])(
    "answers %j with 500",
    (line) => expect(dialog(rcpt(), line)).toEqual(["500 command not recognized\r\n"]),
  );

  it("answers a line over 1000 octets with 500 and closes", () => {
    expect(feed(rcpt(), "NOOP " + "x".repeat(MAX_LINE))).toMatchObject({
      send: "500 line too long\r\n",
      end: "too-long",
    });
  });

  it("counts every line against --max-commands", () => {
    expect(
      feed(
        rcpt({ maxCommands: 3 }),
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@x.example>\r\nRCPT TO:<v@x.example>\r\n",
      ),
    )
      .toMatchObject({ lines: 3, end: "limit" });
  });
});

// ---------------------------------------------------------------------------
// Properties of the core, over random bytes cut at random chunk boundaries.
// ---------------------------------------------------------------------------

/**
 * Cases per mode: 10,000 by default, which `npm test` can afford (about 1 s a mode); a
 * deep run sets SMTP521_PROPERTY_RUNS (.ci/run runs 100,000).
 */
const PROPERTY_RUNS = Number(process.env.SMTP521_PROPERTY_RUNS || 10_000);
if (!Number.isSafeInteger(PROPERTY_RUNS) || PROPERTY_RUNS < 1) {
  throw new Error(
    `SMTP521_PROPERTY_RUNS must be a positive whole number, not ${process.env.SMTP521_PROPERTY_RUNS}`,
  );
}
const encoder = new TextEncoder();
const LINES = [
  "\r\n",
  "\n",
  "\r",
  "QUIT\r\n",
  "quit \r\n",
  "EHLO client.example\r\n",
  "HELO x\r\n",
  "MAIL FROM:<a@b.example>\r\n",
  "MAIL FROM:<>\r\n",
  "RCPT TO:<u@X.Example.>\r\n",
  "RCPT TO:<@r.example:u@d.example>\r\n",
  "RCPT TO:<u@[192.0.2.1]>\r\n",
  "RCPT TO:<Postmaster>\r\n",
  "DATA\r\n",
  "RSET\r\n",
  "VRFY root\r\n",
  "GET / HTTP/1.1\r\n",
  "\x16\x03\x01",
];
/** Random bytes, SMTP lines, recipients with random domains, and runs near the line cap. */
const token = fc.oneof(
  fc.uint8Array({ maxLength: 40 }),
  fc.constantFrom(...LINES).map((line) => encoder.encode(line)),
  fc.string({ unit: "binary-ascii", maxLength: 30 }).map((domain) =>
    encoder.encode(`RCPT TO:<u@${domain}>\r\n`)
  ),
  fc.integer({ min: MAX_LINE - 12, max: MAX_LINE + 4 }).map((n) => new Uint8Array(n).fill(0x41)),
);
const stream = fc.record({
  input: fc.array(token, { maxLength: 24 }).map((parts) =>
    Uint8Array.from(parts.flatMap((p) => [...p]))
  ),
  cuts: fc.array(fc.nat(), { maxLength: 8 }),
});

function chunked(input: Uint8Array, cuts: number[]): Uint8Array[] {
  const at = [...new Set(cuts.map((c) => c % (input.length + 1)))].sort((a, b) => a - b);
  return [0, ...at].map((from, i) => input.subarray(from, i < at.length ? at[i] : input.length));
}

describe.each(["greet", "close", "rcpt"] as const)("properties of the core in %s mode", (mode) => {
  const config: Partial<SessionConfig> = { mode, maxCommands: 12 };
  const table = new Set(Object.values(repliesFor(NAME)));

  it(`holds for ${PROPERTY_RUNS.toLocaleString("en")} random inputs cut at random`, () => {
    fc.assert(
      fc.property(stream, ({ input, cuts }) => {
        const s = session(config);
        const replies: string[] = [s.greeting.send];
        let end = s.greeting.end;
        let lines = 0;
        let sinceLf = 0; // octets since the last LF fed, i.e. what a session may hold
        let lfs = 0;
        let lfsBeforeEnd = 0;
        for (const chunk of chunked(input, cuts)) {
          const step = receive(s, chunk);
          const chunkLfs = chunk.reduce((n, byte) => n + (byte === 10 ? 1 : 0), 0);
          const sent = step.send ? step.send.split(/(?<=\r\n)/) : [];
          if (end) {
            assert.deepEqual(step, { send: "", lines: 0, end: null }); // nothing after the end
            continue;
          }
          lfsBeforeEnd = lfs;
          lfs += chunkLfs;
          lines += step.lines;
          replies.push(...sent);
          const lastLf = chunk.lastIndexOf(10);
          sinceLf = lastLf < 0 ? sinceLf + chunk.length : chunk.length - lastLf - 1;
          if (step.end) {
            end = step.end;
            // One reply per complete line, give or take the line that ended it.
            const expected = step.lines +
              (end === "too-long" ? 1 : end === "forbidden" && step.lines ? -1 : 0);
            assert.equal(sent.length, expected);
            assert.ok(lines >= lfsBeforeEnd);
            assert.ok(lines <= lfs);
          } else {
            assert.equal(sent.length, step.lines);
            assert.equal(step.lines, chunkLfs); // every complete line is answered
            assert.ok(sinceLf < MAX_LINE); // never holds 1000 octets without an end of line
          }
        }
        if (!end) assert.equal(lines, lfs);
        if (mode === "close") assert.deepEqual(replies, [REFUSE]);
        // Every reply comes from the table; in rcpt mode a RCPT reply may name a domain
        // that the client sent, but only checked and lower-cased.
        const text = Buffer.from(input).toString("latin1").toLowerCase();
        for (const reply of replies) {
          if (table.has(reply)) continue;
          const domain = /^(?:521|556) (\S+) does not accept mail\r\n$/.exec(reply)?.[1];
          assert.ok(
            mode === "rcpt" && domain !== undefined,
            `reply not in the table: ${JSON.stringify(reply)}`,
          );
          assert.equal(checkedDomain(domain), domain);
          assert.ok(text.includes(domain.toLowerCase()), `${domain} is not from the input`);
        }
        // Cutting differently changes nothing: one chunk gives the same replies and end.
        const whole = session(config);
        const once = receive(whole, input);
        assert.deepEqual(
          [whole.greeting.send, ...(once.send ? once.send.split(/(?<=\r\n)/) : [])],
          replies,
        );
        assert.equal(whole.greeting.end ?? once.end, end);
      }),
      { numRuns: PROPERTY_RUNS },
    );
  }, 120_000);
});

describe('session core: over a limit (README "Under hostile traffic")', () => {
  it("greets with the 521 and ends at once; later bytes get nothing", () => {
    const s = overloadSession({
      mode: "rcpt",
      name: NAME,
      maxCommands: 20,
      rcptCode: 521,
      domains: null,
    });
    expect(s.greeting).toEqual({ send: REFUSE, lines: 0, end: "overload" });
    expect(receive(s, bytes("EHLO a\r\nQUIT\r\n"))).toEqual({ send: "", lines: 0, end: null });
  });
});

describe('log lines (README "Logs and signals")', () => {
  const TIME = /^time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z /;

  it("text: key=value in order, numbers bare, anything unsafe quoted as JSON", () => {
    const line = formatLine("text", "session", {
      remote: "[2001:db8::1]:25",
      lines: 3,
      space: "a b",
      equals: "a=b",
      quote: 'a"b',
      backslash: "a\\b",
      empty: "",
      odd: "\u00e9\n",
    });
    expect(line).toMatch(TIME);
    expect(line.replace(TIME, "")).toBe(
      "event=session remote=[2001:db8::1]:25 lines=3 " +
        'space="a b" equals="a=b" quote="a\\"b" backslash="a\\\\b" empty="" odd="\u00e9\\n"\n',
    );
  });

  it("json: one object per line, time and event first", () => {
    const line = formatLine("json", "session", { remote: "-", lines: 0 });
    expect(line.endsWith("\n") && !line.slice(0, -1).includes("\n")).toBe(true);
    const parsed = JSON.parse(line);
    expect(Object.keys(parsed)).toEqual(["time", "event", "remote", "lines"]);
    expect(Date.parse(parsed.time)).toBeGreaterThan(Date.parse("2020-01-01"));
    expect(parsed).toMatchObject({ event: "session", remote: "-", lines: 0 });
  });

  it("takes the time an event happened, if given, in both formats", () => {
    const at = Date.UTC(2026, 10, 30, 1, 2, 3, 45);
    expect(formatLine("text", "x", { n: 1 }, at)).toBe(
      "time=2026-11-30T01:02:03.045Z event=x n=1\n",
    );
    expect(JSON.parse(formatLine("json", "x", {}, at + 1000)).time).toBe(
      "2026-11-30T01:02:04.045Z",
    );
  });

  it("keeps the time current across lines", async () => {
    const first = /^time=(\S+)/.exec(formatLine("text", "x", {}))![1];
    await new Promise((resolve) => setTimeout(resolve, 5));
    const second = /^time=(\S+)/.exec(formatLine("text", "x", {}))![1];
    expect(Date.parse(second)).toBeGreaterThan(Date.parse(first));
  });
});

describe("--domains", () => {
  it("parses names, leading-dot parents and literals", () => {
    const list = parseDomainList(" A.example. , .B.example,[192.0.2.1]") as DomainList;
    expect([...list.names]).toEqual(["a.example", "[192.0.2.1]"]);
    expect([...list.parents]).toEqual(["b.example"]);
  });

  it.each([["a..b"], ["bad_name.example"], [".[192.0.2.1]"], [","], ["a.example,-x"]])(
    "rejects %j",
    (text) => {
      expect(typeof parseDomainList(text)).toBe("string");
    },
  );
});

// ---------------------------------------------------------------------------
// Options.
// ---------------------------------------------------------------------------

describe("options", () => {
  it.each([
    ["--listen", "192.0.2.1:25", { host: "192.0.2.1", port: 25 }],
    ["--listen", "[::1]:2525", { host: "::1", port: 2525 }],
    ["--listen", ":25", { host: "", port: 25 }],
    ["--listen", "fd:3", { fd: 3 }],
    ["--port", "0", { host: "", port: 0 }],
  ])("reads %s %s", (flag, value, where) => {
    expect(parseOptions([flag, value])).toMatchObject({ listen: [where] });
  });

  it("takes --rcpt-code 556 in rcpt mode, and 521 (the default) in any mode", () => {
    expect(parseOptions(["--mode", "rcpt", "--rcpt-code", "556"])).toMatchObject({ rcptCode: 556 });
    expect(parseOptions(["--rcpt-code", "521"])).toMatchObject({ mode: "greet", rcptCode: 521 });
  });

  it("says why: a flag that takes no value, one that needs one", () => {
    expect(parseOptions(["--stdio=yes"])).toEqual({ error: "--stdio: takes no value; see --help" });
    expect(parseOptions(["--mode"])).toEqual({ error: "--mode: needs a value; see --help" });
  });

  it("lower-cases --hostname and accepts address literals", () => {
    expect(parseOptions(["--hostname", "NTP1.Example.ORG."])).toMatchObject({
      hostname: "ntp1.example.org",
    });
    expect(parseOptions(["--hostname", "[192.0.2.1]"])).toMatchObject({ hostname: "[192.0.2.1]" });
    expect(parseOptions(["--hostname", "[IPv6:2001:DB8::1]"])).toMatchObject({
      hostname: "[IPv6:2001:db8::1]",
    });
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
    [["--port", "abc"], "--port"],
    [["--port", "70000"], "--port"],
    [["--stdio=yes"], "--stdio"],
    [["--domains", "a.example"], "--domains"],
    [["--rcpt-code", "556"], "--rcpt-code"],
    [["--mode", "close", "--rcpt-code", "556"], "--rcpt-code"],
  ])("rejects %j naming %s", (args, flag) => {
    const result = parseOptions(args);
    expect(result).toHaveProperty("error");
    expect((result as { error: string }).error.startsWith(flag)).toBe(true);
  });
});

// ---------------------------------------------------------------------------
// The real file, spawned on each runtime.
// ---------------------------------------------------------------------------

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
      expect(line).toMatch(
        / remote=127\.0\.0\.1:\d+ local_port=\d+ mode=greet duration_ms=\d+ lines=6 end=quit$/,
      );
      expect(line).toContain(`local_port=${server.port}`);
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });

  it("names itself by the local address literal when no FQDN is known: IPv4 and IPv6", async () => {
    const server = await start(runtime);
    try {
      expect(server.log.find((l) => l.includes("event=start"))).toContain(
        "name_source=local-address",
      );
      expect((await talk(server.port, "QUIT\r\n")).text).toMatch(
        /^521 \[127\.0\.0\.1\] does not accept mail\r\n221 /,
      );
      const v6 = await talk(server.port, "QUIT\r\n", { host: "::1" });
      expect(v6.text).toMatch(
        /^521 \[IPv6:::1\] does not accept mail\r\n221 \[IPv6:::1\] closing connection\r\n$/,
      );
    } finally {
      await server.stop();
    }
  });

  const noUts = isRoot ? "" : "setting a host name in a new UTS namespace needs root";
  it.skipIf(noUts)(
    unless(
      "names itself by a fully qualified system host name, where it may read it without a prompt",
      noUts,
    ),
    async () => {
      // A private UTS namespace with a fully qualified host name; Deno may read it only with --allow-sys.
      const wrap = ["unshare", "--uts", "sh", "-c", 'hostname Mx.Test.Example && exec "$@"', "sh"];
      const server = await start(runtime, [], wrap);
      try {
        const start_ = server.log.find((l) => l.includes("event=start"))!;
        const expected = runtime === "deno" ? "[127.0.0.1]" : "mx.test.example";
        expect(start_).toContain(
          runtime === "deno"
            ? "name_source=local-address"
            : "name=mx.test.example name_source=system",
        );
        expect((await talk(server.port, "QUIT\r\n")).text).toBe(
          greeting(expected) + `221 ${expected} closing connection\r\n`,
        );
      } finally {
        await server.stop();
      }
    },
  );

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
      const got = await talk(server.port, "NOOP\r\n", { ms: 15_000 });
      expect(got.text).toBe(greeting("ntp1.example.org").repeat(2));
      expect(got.ending).toBe("fin"); // the server closed it, not our own 15 s bound
      // Not before the time-out (timers never fire early); the upper bound only says "at the
      // time-out, not at some later event": 10 s leaves a loaded machine 9.5 s of lateness.
      expect(got.ms).toBeGreaterThanOrEqual(450);
      expect(got.ms).toBeLessThan(10_000);
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

  it("rcpt mode: 220, EHLO 250, MAIL 250, RCPT 521 or 550 by --domains, DATA 554, QUIT 221", async () => {
    const server = await start(runtime, [
      "--mode",
      "rcpt",
      "--hostname",
      "relay.example",
      "--domains",
      "ntp1.example,.dns.example",
    ]);
    try {
      const lines = [
        "EHLO client.example",
        "MAIL FROM:<a@client.example>",
        "RCPT TO:<root@NTP1.example.>",
        "RCPT TO:<root@ns1.dns.example>",
        "RCPT TO:<victim@elsewhere.example>",
        "DATA",
        "QUIT",
      ];
      const got = await talk(server.port, lines.map((l) => `${l}\r\n`).join(""));
      expect(got.text.split("\r\n")).toEqual([
        "220 relay.example ESMTP refuses all mail",
        "250 relay.example",
        "250 OK",
        "521 ntp1.example does not accept mail",
        "521 ns1.dns.example does not accept mail",
        "550 relaying denied",
        "554 no valid recipients",
        "221 relay.example closing connection",
        "",
      ]);
      expect(got.ending).toBe("fin");
      await server.waitFor(/event=session .* mode=rcpt .* lines=7 end=quit$/);
    } finally {
      await server.stop();
    }
  });

  it("exits 0 on SIGTERM with a summary line", async () => {
    const server = await start(runtime);
    await talk(server.port, "QUIT\r\n");
    await server.waitFor(/event=session /);
    expect(await server.stop("SIGTERM")).toBe(0);
    expect(server.log.some((l) => /event=stop signal=SIGTERM sessions=1 quit=1$/.test(l))).toBe(
      true,
    );
  });
});

// ---------------------------------------------------------------------------
// Real clients (README "Which mode": what each does with a 521).
// ---------------------------------------------------------------------------

/** curl's smtp:// client sending one message to `rcpt`. */
function curlSend(port: number, rcpt: string) {
  const args = [
    "-sS",
    `smtp://127.0.0.1:${port}`,
    "--mail-from",
    "a@client.example",
    "--mail-rcpt",
    rcpt,
    "-T",
    "-",
  ];
  return run("curl", args, { input: "Subject: hi\r\n\r\nhello\r\n" });
}

/** One message by nodemailer, as an application on another host would send it. */
const sendMail = (port: number, to: string) =>
  nodemailer.createTransport({ host: "127.0.0.1", port, secure: false })
    .sendMail({ from: "a@client.example", to, text: "hello" });

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
      const got = await curlSend(server.port, "b@ntp1.example.org");
      expect(got.code).toBe(8);
      expect(got.stderr).toContain("521");
    } finally {
      await server.stop();
    }
  });

  it("nodemailer fails with EPROTOCOL and responseCode 521", async () => {
    const server = await start("node", ["--hostname", "ntp1.example.org"]);
    try {
      const sent = sendMail(server.port, "b@ntp1.example.org");
      await expect(sent).rejects.toMatchObject({
        code: "EPROTOCOL",
        responseCode: 521,
        command: "CONN",
      });
    } finally {
      await server.stop();
    }
  });
});

describe("real clients against rcpt mode", () => {
  const smtplibSend = (port: number) =>
    run("python3", [
      "-c",
      [
        "import smtplib",
        `s = smtplib.SMTP('127.0.0.1', ${port}, timeout=5)`,
        "try:",
        "    s.sendmail('a@client.example', ['root@ntp1.example'], 'Subject: hi\\r\\n\\r\\nhello\\r\\n')",
        "except smtplib.SMTPRecipientsRefused as e:",
        "    code, text = e.recipients['root@ntp1.example']",
        "    print(type(e).__name__, code, text.decode())",
        "s.quit()",
      ].join("\n"),
    ]);

  it("Python smtplib raises SMTPRecipientsRefused with 521", async () => {
    const server = await start("node", ["--mode", "rcpt", "--hostname", "relay.example"]);
    try {
      expect((await smtplibSend(server.port)).stdout).toBe(
        "SMTPRecipientsRefused 521 ntp1.example does not accept mail\n",
      );
      await server.waitFor(/event=session .* end=quit$/);
    } finally {
      await server.stop();
    }
  });

  it("Python smtplib raises SMTPRecipientsRefused with 556 under --rcpt-code 556", async () => {
    const server = await start("node", ["--mode", "rcpt", "--rcpt-code", "556"]);
    try {
      expect((await smtplibSend(server.port)).stdout).toBe(
        "SMTPRecipientsRefused 556 ntp1.example does not accept mail\n",
      );
    } finally {
      await server.stop();
    }
  });

  it("curl's smtp:// exits 55", async () => {
    const server = await start("node", ["--mode", "rcpt"]);
    try {
      const got = await curlSend(server.port, "root@ntp1.example");
      expect(got.code).toBe(55);
      expect(got.stderr).toContain("521");
    } finally {
      await server.stop();
    }
  });

  it("nodemailer sending to a listed domain fails with EENVELOPE and the 521", async () => {
    const server = await start("node", ["--mode", "rcpt", "--domains", "ntp1.example"]);
    try {
      const sent = sendMail(server.port, "root@ntp1.example");
      await expect(sent).rejects.toMatchObject({
        code: "EENVELOPE",
        responseCode: 521,
        response: "521 ntp1.example does not accept mail",
      });
    } finally {
      await server.stop();
    }
  });
});

// ---------------------------------------------------------------------------
// The command line (README "Flags").
// ---------------------------------------------------------------------------

describe("the command line", () => {
  const node = RUNTIMES.node;

  it("--help and -h exit 0 with the usage on stdout, nothing on stderr", async () => {
    const long = await run(node[0], [FILE, "--help"]);
    expect(long).toMatchObject({ code: 0, stderr: "" });
    expect(long.stdout).toMatch(
      /^smtp521 \S+: refuse all mail[^]*\nusage: smtp521\.ts \[flags\]\n/,
    );
    expect(await run(node[0], [FILE, "-h"])).toEqual(long);
  });

  it("the parser, --help and the README's flag table name the same flags, and the parser takes each", async () => {
    const parser = parserFlags();
    const help = helpFlags((await run(node[0], [FILE, "--help"])).stdout);
    const readme = readmeFlags();
    expect(parser.size).toBeGreaterThanOrEqual(10); // the table was found and read
    const longs = [...parser.keys()].sort();
    expect([...help.keys()].sort(), "--help").toEqual(longs);
    expect([...readme.keys()].sort(), "README").toEqual(longs);
    for (const [flag, { type, short }] of parser) {
      const names = [`--${flag}`, ...(short ? [`-${short}`] : [])];
      expect(help.get(flag)!.names, `--help: ${flag}`).toEqual(names);
      expect(readme.get(flag)!.names, `README: ${flag}`).toEqual(names);
      for (const name of names) {
        const parsed = parseOptions(type === "boolean" ? [name] : [name, "1"]);
        expect("error" in parsed ? parsed.error : "", name).not.toMatch(/unknown flag/);
      }
    }
    expect(parseOptions(["--no-such-flag"])).toEqual({
      error: "--no-such-flag: unknown flag; see --help",
    });
  });

  it("each default in --help and in the README is the one the server takes", async () => {
    const parser = parserFlags();
    const help = helpFlags((await run(node[0], [FILE, "--help"])).stdout);
    const readme = readmeFlags();
    // The server's options with no flags, in each mode whose defaults may differ.
    const taken = [[], ["--mode", "rcpt"]].map((args) => {
      const options = parseOptions(args);
      if ("error" in options) throw new Error(options.error);
      return options as unknown as Record<string, unknown>;
    });
    const numbers = (text: string) =>
      [...new Set([...text.matchAll(/\b\d+\b/g)].map(Number))].sort((a, b) => a - b);
    /** What a flag left out means when it has no value: a phrase both documents must use. */
    const UNSET: Record<string, RegExp> = {
      hostname: /FQDN.* local address/,
      domains: /every domain/,
      user: /^none$/,
    };
    let checked = 0;
    for (const [flag, { type }] of parser) {
      const documented = readme.get(flag)!.default.replaceAll("`", "");
      const shortFor = /\bshort for (--[\w-]+)/.exec(help.get(flag)!.text)?.[1];
      const helped = help.get(flag)!.default ||
        (shortFor ? help.get(shortFor.slice(2))!.default : "");
      const where = `--${flag}: README "${documented}", --help "${helped}"`;
      const values = taken.map((options) => takenValue(options, flag));
      if (type === "boolean") {
        expect(values, where).toEqual([false, false]);
        expect(["", "off"], where).toContain(documented);
        expect(["", "off"], where).toContain(helped);
      } else if (numbers(documented).length) {
        const took = [...new Set(values.flat() as number[])].sort((a, b) => a - b);
        expect(numbers(documented), where).toEqual(took);
        expect(numbers(helped), where).toEqual(took);
      } else if (flag in UNSET) {
        expect(values.every((value) => value === undefined || value === null), where).toBe(true);
        expect(documented, where).toMatch(UNSET[flag]);
        expect(helped, where).toMatch(UNSET[flag]);
      } else {
        expect(typeof values[0], where).toBe("string");
        expect(documented, where).toBe(values[0]);
        expect(helped, where).toBe(values[0]);
      }
      checked++;
    }
    expect(checked).toBe(parser.size);
  });

  it("real sessions get the default limits: --max-commands in greet and rcpt modes, --max-per-ip", async () => {
    for (const mode of ["greet", "rcpt"]) {
      const options = parseOptions(["--mode", mode]) as { maxCommands: number };
      const n = options.maxCommands;
      const server = await start("node", ["--mode", mode, "--hostname", "ntp1.example.org"]);
      try {
        const got = await talk(server.port, "NOOP\r\n".repeat(n + 5), { ms: 15_000 });
        expect(got.ending, mode).toBe("fin");
        expect(got.text.split("\r\n").length - 1, mode).toBe(1 + n); // the greeting and n replies
        await server.waitFor(new RegExp(` lines=${n} end=limit$`));
      } finally {
        await server.stop();
      }
    }
    const perIp = (parseOptions([]) as { maxPerIp: number }).maxPerIp;
    const server = await start("node", ["--hostname", "ntp1.example.org"]);
    const held: Socket[] = [];
    try {
      for (let i = 0; i < perIp; i++) {
        const socket = connect({ host: "127.0.0.1", port: server.port }).on("error", () => {});
        held.push(socket);
        await within(
          new Promise((resolve) => socket.once("data", resolve)),
          15_000,
          `greeting ${i + 1}`,
        );
      }
      expect(await talk(server.port, "NOOP\r\n", { ms: 15_000 })).toMatchObject({
        text: greeting("ntp1.example.org"),
        ending: "fin",
      });
      await server.waitFor(/ end=overload$/);
      expect(server.log.filter((line) => line.endsWith(" end=overload"))).toHaveLength(1);
    } finally {
      for (const socket of held) socket.destroy();
      await server.stop();
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
    [
      ["--hostname", "<script>"],
      /^smtp521: --hostname: .* is not a domain name or address literal/,
    ],
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
        new RegExp(
          `^smtp521: cannot listen on 127\\.0\\.0\\.1:${port}: EADDRINUSE; .*--listen\\n$`,
        ),
      );
    } finally {
      holder.close();
    }
  });

  const lowestFreePort = Number(
    readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8"),
  );
  const anyoneBinds25 = lowestFreePort <= 25
    ? "this kernel lets anyone bind port 25 (ip_unprivileged_port_start)"
    : "";
  it.skipIf(anyoneBinds25)(
    unless(
      "port 25 without the privilege exits 1 naming root, CAP_NET_BIND_SERVICE and a higher port",
      anyoneBinds25,
    ),
    async () => {
      // As root, run the file as nobody, from a copy nobody can read: the checkout may be private
      // (a clone in a mode-0700 `mktemp -d` directory). Any other user already lacks the privilege.
      const copy = isRoot ? forAnyUser() : undefined;
      try {
        const [command, args] = copy
          ? ["setpriv", [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            copy.node,
            copy.file,
            "--port",
            "25",
          ]]
          : [node[0], [FILE, "--port", "25"]];
        const got = await run(command, args);
        expect(got.stderr).toMatch(
          /^smtp521: cannot listen on \[::\]:25: EACCES; .*root.*CAP_NET_BIND_SERVICE.*port above 1023\n$/,
        );
        expect(got.code).toBe(1);
      } finally {
        copy?.remove();
      }
    },
  );
});

// ---------------------------------------------------------------------------
// The sources of the flag checks above, each read from where it lives.
// ---------------------------------------------------------------------------

/** The flags parseOptions hands to parseArgs, read from the table in smtp521.ts. */
function parserFlags(): Map<string, { type: string; short?: string }> {
  const source = readFileSync(FILE, "utf8");
  const parse = source.slice(source.indexOf("export function parseOptions("));
  const name = /parseArgs\(\{[^}]*\boptions: (\w+)/.exec(parse)?.[1];
  const at = source.indexOf(`const ${name} = {`);
  if (!name || at < 0) {
    throw new Error("smtp521.ts: no parseArgs options table found for parseOptions");
  }
  const table = source.slice(at, source.indexOf("\n}", at));
  const flags = new Map<string, { type: string; short?: string }>();
  for (const [, flag, body] of table.matchAll(/^ +"?([\w-]+)"?: \{([^}]*)\}/gm)) {
    flags.set(flag, {
      type: /type: "(\w+)"/.exec(body)![1],
      short: /short: "(\w)"/.exec(body)?.[1],
    });
  }
  return flags;
}

interface FlagDoc {
  /** As written: `--mode`, or `--help` and `-h`. */
  readonly names: string[];
  /** The default as written ("" when none is given). */
  readonly default: string;
  /** The whole entry. */
  readonly text: string;
}

/** The real --help: an entry starts with "  --flag" (or "  -h, --help"), its default is "(default ...)". */
function helpFlags(stdout: string): Map<string, FlagDoc> {
  const entries: { names: string[]; lines: string[] }[] = [];
  for (const line of stdout.split("\n")) {
    const flags = /^ {2}((?:-\w, )?--[\w-]+)/.exec(line)?.[1];
    if (flags) entries.push({ names: flags.split(", "), lines: [line] });
    else if (entries.length && /^ {6,}\S/.test(line)) entries.at(-1)!.lines.push(line);
    else entries.push({ names: [], lines: [] }); // a blank or other line ends an entry
  }
  const flags = new Map<string, FlagDoc>();
  for (const { names, lines } of entries.filter((entry) => entry.names.length)) {
    const text = lines.map((line) => line.trim()).join(" ");
    const value = /\(default:? ([^)]*)\)/.exec(text)?.[1] ?? "";
    const long = names.find((n) => n.startsWith("--"))!.slice(2);
    flags.set(long, {
      names: [`--${long}`, ...names.filter((n) => !n.startsWith("--"))],
      default: value,
      text,
    });
  }
  return flags;
}

/** The README's "## Flags" table: a row's flags, in backquotes in its first cell, and its default cell. */
function readmeFlags(): Map<string, FlagDoc> {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const at = readme.indexOf("\n## Flags\n");
  if (at < 0) throw new Error('README.md: no "## Flags" section');
  const section = readme.slice(at, readme.indexOf("\n## ", at + 1));
  const flags = new Map<string, FlagDoc>();
  for (const row of section.split("\n").filter((line) => /^\| `-/.test(line))) {
    const [, first, value] = row.split(/(?<!\\)\|/).map((cell) => cell.trim());
    const names = [...first.matchAll(/`(--?[\w-]+)/g)].map((m) => m[1]);
    const long = names.find((n) => n.startsWith("--"))!.slice(2);
    flags.set(long, {
      names: [`--${long}`, ...names.filter((n) => !n.startsWith("--"))],
      default: value,
      text: row,
    });
  }
  return flags;
}

/** A flag's value in the server's options: the same name in camelCase, seconds as milliseconds, ports from --listen. */
function takenValue(options: Record<string, unknown>, flag: string): unknown {
  if (flag === "listen" || flag === "port") {
    return (options.listen as { port?: number }[]).map((where) => where.port);
  }
  if (flag === "log") return options.logFormat;
  const key = flag.replace(/-(\w)/g, (_, c: string) => c.toUpperCase());
  if (key in options) return options[key];
  if (`${key}Ms` in options) return (options[`${key}Ms`] as number) / 1000;
  throw new Error(`--${flag}: no option ${key} or ${key}Ms in parseOptions' result`);
}

// ---------------------------------------------------------------------------
// The repository a sysadmin reads before copying smtp521.ts (README "Development").
// ---------------------------------------------------------------------------

describe("the repository stands on its own", () => {
  const tracked = execFileSync("git", ["ls-files"], { cwd: ROOT, encoding: "utf8" })
    .split("\n")
    .filter((file) => /\.(ts|md|json|service|socket|sh)$|^\.ci\/|^examples\//.test(file));

  it("smtp521.ts fits one sitting: at most 1,400 lines, none over 100 columns", () => {
    const lines = readFileSync(FILE, "utf8").split("\n");
    expect(lines.length).toBeGreaterThan(500); // the file was read
    expect(lines.length).toBeLessThanOrEqual(1400);
    const wide = lines.flatMap((line, i) => ([...line].length > 100 ? [`${i + 1}: ${line}`] : []));
    expect(wide).toEqual([]);
  });

  it("no file cites a document the repository does not hold", () => {
    // The team's contract and measurement notes live outside the repository.
    const outside = /\bS[P]EC\b|I[N]TEROP\.md|R[U]NTIMES\.md/;
    expect(tracked.length).toBeGreaterThan(20);
    const citing = tracked.filter((file) => outside.test(readFileSync(join(ROOT, file), "utf8")));
    expect(citing).toEqual([]);
  });

  it("every file README.md names exists, at the top or in examples/", () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const named = [...readme.matchAll(/`([^`\s]+)`/g)].map((m) => m[1]).filter((name) =>
      /^(bench|test|examples|\.ci)\//.test(name) ||
      /^[\w.@-]+\.(ts|json|md|service|socket)$/.test(name)
    );
    expect(named.length).toBeGreaterThan(10); // the names were found
    const missing = named.filter((name) =>
      !existsSync(join(ROOT, name)) && !existsSync(join(ROOT, "examples", name))
    );
    expect(missing).toEqual([]);
  });
});
