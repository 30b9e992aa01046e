#!/usr/bin/env -S deno run --allow-net --no-prompt
/**
 * probe.ts: the administrator's check that a host, or a whole domain, refuses
 * mail the RFC 1846 way (README, "The probe"). It runs from a workstation, not
 * on the host it checks, and shares no code with smtp521.ts.
 *
 *   RFC 1846  SMTP 521 Reply Code (§3 a relay refuses at RCPT; §4.1, §4.2 greeting)
 *   RFC 7504  SMTP 521 and 556 Reply Codes (§3)
 *   RFC 5321  SMTP (§4.2 replies, §5.1 which hosts a sender tries)
 *   RFC 7505  Null MX (§3: `MX 0 .` alone means "no mail", never with other MX)
 *
 * Usage (one file, no dependencies; Deno, Node >= 22.18 or Bun):
 *
 *   deno run --allow-net probe.ts mx.example[:25] [--rcpt user@domain] [--json]
 *   node probe.ts --domain nomail.example [--resolver 192.0.2.53] [--json]
 *
 * It never sends DATA: at most EHLO (or HELO), `MAIL FROM:<>`, one RCPT, QUIT.
 * As a library: `probeHost`, `probeDomain` and `lookup` (a small DNS client).
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { randomInt } from "node:crypto";
import { createSocket } from "node:dgram";
import { readFileSync } from "node:fs";
import { connect, isIP, isIPv4, isIPv6 } from "node:net";
import process from "node:process";
import { clearInterval, clearTimeout, setInterval, setTimeout } from "node:timers";
import { parseArgs } from "node:util";

// ---------------------------------------------------------------------------
// Names and text from the network.
// ---------------------------------------------------------------------------

/** RFC 5321 §4.1.2 Domain: LDH labels of 1-63 octets, 253 octets in all. */
const LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
const DOMAIN = new RegExp(`^(?=.{1,253}$)${LABEL}(?:\\.${LABEL})*$`, "i");

/**
 * A well-formed domain (lower-cased, one trailing dot dropped) or address
 * literal (RFC 5321 §4.1.3: a dotted quad, or `IPv6:` and an address with no
 * zone id `%...`, which has no meaning off the sender's host); else null.
 */
export function checkedDomain(text: string): string | null {
  if (text.startsWith("[") && text.endsWith("]")) {
    const inner = text.slice(1, -1);
    if (isIPv4(inner)) return text;
    const v6 = /^ipv6:([0-9a-f:.]+)$/i.exec(inner);
    return v6 && isIPv6(v6[1]) ? `[IPv6:${v6[1].toLowerCase()}]` : null;
  }
  const name = text.endsWith(".") ? text.slice(0, -1) : text;
  return DOMAIN.test(name) ? name.toLowerCase() : null;
}

/** An IP address as RFC 5321 §4.1.3 writes it; IPv4-mapped IPv6 as IPv4, no zone id. */
export function addressLiteral(ip: string): string {
  const plain = ip.replace(/%.*$/, "").replace(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i, "$1");
  return isIPv6(plain) ? `[IPv6:${plain}]` : `[${plain}]`;
}

/** `192.0.2.1:25`, `[2001:db8::1]:25`, `mx.example:25`. */
export function hostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Server text for a terminal: all but printable ASCII (C0, DEL, C1 and the rest) is "?". */
export const printable = (text: string): string => text.replace(/[^\x20-\x7e]/g, "?").slice(0, 200);

/** JSON in printable ASCII: JSON.stringify escapes C0; this escapes DEL, C1 and the rest. */
export const asciiJson = (value: unknown): string =>
  JSON.stringify(value).replace(
    /[\x7f-\uffff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );

// ---------------------------------------------------------------------------
// The host check: play the sending client of RFC 1846 §5 against one address,
// say whether it refuses mail the RFC 1846 / RFC 7504 way and what senders do.
// ---------------------------------------------------------------------------

/** Exit codes, both forms (README, "The probe"). */
export const EXIT = Object.freeze({ refuses: 0, wrong: 1, usage: 2, unreachable: 3 });

/** What a sending MTA does on a path, in a word (the README's interop table). */
export type Action = "bounce" | "bounce-or-queue" | "queue" | "deliver" | "skip" | "unknown";
const ACTION_TEXT: Record<Action, string> = {
  bounce: "bounce now",
  "bounce-or-queue": "bounce or queue",
  queue: "queue for days",
  deliver: "deliver",
  skip: "skip the host",
  unknown: "depends on MTA",
};

/** What sending MTAs did with each answer, measured (README, interop table). */
const SENDERS = Object.freeze({
  greeting: "Exim, Sendmail and Haraka bounce at once; Postfix with default settings " +
    "(smtp_skip_5xx_greeting = yes) and OpenSMTPD queue for days: consider --mode rcpt",
  rcpt: "Postfix, Exim, OpenSMTPD, Sendmail and Haraka all bounce at once",
  queue: "they queue the mail and retry for days (a temporary failure, RFC 5321 section 4.5.4.1)",
  deliver: "they deliver: this host accepts mail",
  bounce: "they bounce at once (a permanent failure), " +
    "but are not told that this host takes no mail",
  unknown: "depends on the sender: RFC 1846 and RFC 7504 define no such answer",
});
const ACTION_OF: Record<string, Action> = {
  [SENDERS.greeting]: "bounce-or-queue",
  [SENDERS.rcpt]: "bounce",
  [SENDERS.queue]: "queue",
  [SENDERS.deliver]: "deliver",
  [SENDERS.bounce]: "bounce",
  [SENDERS.unknown]: "unknown",
};

/** A line sent or received, or an event (connected, closed, time-out); `ms` from the start. */
export type ProbeLine = {
  readonly ms: number;
  readonly dir: "sent" | "received" | "event";
  readonly text: string;
};
/** What the host check found: its `--json` object. */
export interface ProbeReport {
  readonly target: string;
  readonly greeting: string | null;
  readonly mode: "greet" | "close" | "rcpt" | "none";
  readonly name: string | null;
  readonly quit: string | null;
  readonly verdict: string;
  readonly senders: string;
  readonly action: Action;
  readonly exit: number;
  readonly transcript: readonly ProbeLine[];
}
type Finding = Pick<ProbeReport, "mode" | "verdict" | "senders" | "exit">;
/** A reply (RFC 5321 §4.2: its code and first line), or why none came. */
type Reply = { readonly code: number; readonly line: string };
type Heard = Reply | keyof typeof FAILED;
const FAILED = Object.freeze({
  timeout: "no reply within --timeout",
  closed: "a close",
  garbled: "not an SMTP reply",
});

const wrong = (
  why: string,
  senders: string = SENDERS.unknown,
  mode: Finding["mode"] = "none",
): Finding => ({
  mode,
  verdict: `does NOT refuse mail the RFC 1846 way: ${why}`,
  senders,
  exit: EXIT.wrong,
});
const refuses = (mode: Finding["mode"], how: string, senders: string): Finding => ({
  mode,
  verdict: `refuses mail per RFC 1846/RFC 7504: ${how}`,
  senders,
  exit: EXIT.refuses,
});
function has(heard: Heard, ...codes: number[]): boolean {
  return typeof heard !== "string" && codes.includes(heard.code);
}
function quoted(heard: Heard): string {
  return typeof heard === "string" ? FAILED[heard] : `"${printable(heard.line)}"`;
}

/** RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
const MAX_LINE = 1000;

/**
 * One client connection. Every read ends by one deadline, `timeoutMs` after
 * the connection was begun: the time-out bounds the whole probe, not each
 * read. Every line and event goes into `transcript`.
 */
function smtpClient(host: string, port: number, timeoutMs: number, transcript: ProbeLine[]) {
  const begun = Date.now();
  const deadline = begun + timeoutMs;
  const note = (dir: ProbeLine["dir"], text: string) => {
    transcript.push({ ms: Date.now() - begun, dir, text });
  };
  const socket = connect({ host, port });
  const lines: string[] = [];
  let partial = "";
  let received = 0;
  let connected = false;
  let ended: string | null = null;
  let wake = () => {};
  const flooded = () => received > 65_536 || partial.length > MAX_LINE;
  const end = (why: string) => {
    if (!ended) note("event", ended = why);
    wake();
  };
  socket.on("connect", () => {
    connected = true;
    note("event", "connected");
  });
  socket.on("data", (chunk: Buffer) => {
    received += chunk.length;
    const complete = (partial + chunk.toString("latin1")).split("\n");
    partial = complete.pop()!;
    for (const line of complete.map((text) => text.replace(/\r$/, ""))) {
      note("received", line);
      lines.push(line);
    }
    if (flooded()) socket.destroy(); // not SMTP: stop reading
    wake();
  });
  socket.on("end", () => end("closed by the server"));
  socket.on("error", (error: NodeJS.ErrnoException) => end(error.code ?? error.message));
  socket.on("close", () => end("closed"));

  /**
   * RFC 5321 §4.2: `250-...` lines continue a reply, the line with a space (or
   * the bare code) ends it, and every line carries the same code: a reply
   * whose lines disagree (`521-x` then `220 x`) is not SMTP.
   */
  function reply(): Heard | undefined {
    const last = lines.findIndex((line) => !/^\d{3}-/.test(line));
    if (last < 0) return flooded() ? "garbled" : ended ? "closed" : undefined;
    const taken = lines.splice(0, last + 1);
    const code = taken[0].slice(0, 3);
    const smtp = taken.every((line) => /^\d{3}(?:[ -].*)?$/s.test(line) && line.startsWith(code));
    return smtp ? { code: Number(code), line: taken[0] } : "garbled";
  }
  const read = () =>
    new Promise<Heard>((resolve) => {
      const settle = (heard: Heard) => {
        clearTimeout(timer);
        wake = () => {};
        resolve(heard);
      };
      const timer = setTimeout(() => {
        note("event", "time-out");
        settle("timeout");
      }, Math.max(0, deadline - Date.now()));
      wake = () => {
        const heard = reply();
        if (heard) settle(heard);
      };
      wake();
    });

  return {
    read,
    /** Why the connection failed, or null when it was made. */
    failure: () => connected ? null : ended ?? "no connection within --timeout",
    open: () => !ended,
    /** RFC 5321 §4.1.4: a client without a name says EHLO with its address literal. */
    literal: () => addressLiteral(socket.localAddress ?? "127.0.0.1"),
    command(line: string): Promise<Heard> {
      if (ended) return Promise.resolve("closed");
      note("sent", line);
      socket.write(`${line}\r\n`);
      return read();
    },
    close: () => socket.destroy(),
  };
}
type SmtpClient = ReturnType<typeof smtpClient>;

/** RFC 1846 §4.2: after a 521 greeting, a server closes (a) or answers 521 to all but QUIT (b). */
async function afterRefusal(client: SmtpClient): Promise<Finding> {
  const noop = await client.command("NOOP"); // RFC 5321 §4.1.1.9: has no effect
  if (noop === "closed") {
    return refuses("close", "521 greeting, then close (RFC 1846 section 4.2 a)", SENDERS.greeting);
  }
  if (!has(noop, 521)) {
    return wrong(`NOOP after the 521 greeting got ${quoted(noop)}, not 521`, SENDERS.greeting);
  }
  return refuses(
    "greet",
    "521 greeting, 521 to a command, 221 to QUIT (RFC 1846 section 4.2 b)",
    SENDERS.greeting,
  );
}

/** RFC 1846 §3: a relay greets 220 and refuses the recipient with 521 (or 556, RFC 7504 §3). */
async function atRecipient(client: SmtpClient, to: string, chosen: boolean): Promise<Finding> {
  let hello = await client.command(`EHLO ${client.literal()}`);
  if (typeof hello !== "string" && hello.code >= 500) { // RFC 5321 §3.2: EHLO may be unknown
    hello = await client.command(`HELO ${client.literal()}`);
  }
  if (!has(hello, 250)) return wrong(`EHLO/HELO got ${quoted(hello)}`);
  const mail = await client.command("MAIL FROM:<>"); // RFC 5321 §4.5.5: the null sender
  if (!has(mail, 250)) return wrong(`MAIL FROM:<> got ${quoted(mail)}`);
  const rcpt = await client.command(`RCPT TO:<${to}>`);
  if (has(rcpt, 521, 556)) {
    return refuses("rcpt", `220, then ${quoted(rcpt)} to RCPT TO:<${to}>`, SENDERS.rcpt);
  }
  if (has(rcpt, 550) && !chosen) {
    return wrong(
      `RCPT TO:<${to}> got 550: not a domain this relay refuses for: ` +
        "pass --rcpt user@<a domain it refuses>",
      SENDERS.bounce,
    );
  }
  if (typeof rcpt === "string") return wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}`);
  if (rcpt.code < 400) {
    return wrong(`it accepted the recipient <${to}> (${quoted(rcpt)})`, SENDERS.deliver);
  }
  return rcpt.code < 500
    ? wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}, a temporary failure`, SENDERS.queue)
    : wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}, not 521 or 556`, SENDERS.bounce);
}

export interface ProbeOptions {
  /** A name or an IP address. */
  readonly host: string;
  readonly port: number;
  /** The recipient after a 220 greeting; default `postmaster@<name in the greeting>`. */
  readonly rcpt?: string;
  /** Bounds the whole probe: connection, greeting and every reply. @default 10_000 */
  readonly timeoutMs?: number;
}

/** What the greeting (RFC 5321 §4.2, RFC 7504 §3) and the dialog after it say. */
async function judge(
  client: SmtpClient,
  greeting: Reply,
  name: string | null,
  rcpt?: string,
): Promise<Finding> {
  if (greeting.code === 521) {
    return name
      ? await afterRefusal(client)
      : wrong("the 521 greeting names no host (RFC 1846 section 4.1)", SENDERS.greeting);
  }
  if (greeting.code !== 220) {
    return wrong(
      `it greets ${quoted(greeting)}, not 521 (RFC 7504 section 3)`,
      greeting.code < 500 ? SENDERS.queue : undefined,
    );
  }
  const to = rcpt ?? (name && `postmaster@${name}`);
  if (!to) return wrong("the greeting names no host: pass --rcpt");
  return await atRecipient(client, to, rcpt !== undefined);
}

/** Check one host; resolves with the report, never rejects. */
export async function probeHost(o: ProbeOptions): Promise<ProbeReport> {
  const transcript: ProbeLine[] = [];
  const client = smtpClient(o.host, o.port, o.timeoutMs ?? 10_000, transcript);
  const report = (
    found: Finding,
    greeting: string | null,
    name: string | null,
    quit: string | null,
  ): ProbeReport => {
    const { mode, verdict, senders, exit } = found;
    const target = hostPort(o.host, o.port);
    const action = ACTION_OF[senders] ?? "unknown";
    return {
      target,
      greeting,
      mode,
      name,
      quit,
      verdict,
      senders,
      action,
      exit,
      transcript: [...transcript],
    };
  };
  const cannot = (verdict: string) =>
    report(
      { mode: "none", verdict, senders: SENDERS.queue, exit: EXIT.unreachable },
      null,
      null,
      null,
    );
  try {
    const greeting = await client.read(); // the connection and the greeting
    if (greeting === "closed" || greeting === "timeout") {
      const failure = client.failure();
      return cannot(failure ? `cannot be reached: ${failure}` : `no greeting: ${quoted(greeting)}`);
    }
    if (greeting === "garbled") {
      return report(wrong(`the greeting is ${quoted(greeting)}`), null, null, null);
    }
    // RFC 1846 §4.1, RFC 5321 §4.2: the first word after the code is a domain or address literal.
    const name = checkedDomain(greeting.line.slice(4).split(/[ \t]/)[0]);
    let found = await judge(client, greeting, name, o.rcpt);
    const open = client.open();
    const quit = await client.command("QUIT"); // RFC 5321 §4.1.1.10; not sent after a close
    if (found.exit === EXIT.refuses && open && !has(quit, 221)) {
      const why = `QUIT got ${quoted(quit)}, not 221 (RFC 5321 section 4.1.1.10)`;
      found = wrong(why, found.senders, found.mode);
    }
    const quitText = !open ? null : typeof quit === "string" ? quoted(quit) : quit.line;
    return report(found, greeting.line, name, quitText);
  } finally {
    client.close();
  }
}

// ---------------------------------------------------------------------------
// DNS: a small stub resolver over UDP (node:dgram), the same on Deno, Node and
// Bun with network access alone (README, "The probe", for why not node:dns).
// One question, recursion desired, answers parsed with name compression.
// ---------------------------------------------------------------------------

export type RecordType = "MX" | "A" | "AAAA";
const TYPE_CODES = { A: 1, CNAME: 5, MX: 15, AAAA: 28 } as const;
const RCODES = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];

export interface Resolver {
  readonly host: string;
  readonly port: number;
}
export type MxRecord = { readonly preference: number; readonly exchange: string };
/** One lookup: `status` is the RCODE name, or "time-out", "truncated", "malformed", an error. */
export interface Lookup {
  readonly name: string;
  readonly type: RecordType;
  readonly status: string;
  /** MX records, or addresses for A and AAAA; CNAMEs followed (up to 8). */
  readonly records: readonly (MxRecord | string)[];
  readonly ms: number;
}

function dnsQuery(id: number, name: string, type: number): Buffer {
  const header = Buffer.alloc(12);
  header.writeUInt16BE(id, 0);
  header.writeUInt16BE(0x0100, 2); // RD: recursion desired
  header.writeUInt16BE(1, 4); // one question
  const labels = name.split(".").map((label) =>
    Buffer.concat([Buffer.from([label.length]), Buffer.from(label, "latin1")])
  );
  const tail = Buffer.alloc(5);
  tail.writeUInt16BE(type, 1);
  tail.writeUInt16BE(1, 3); // class IN
  return Buffer.concat([header, ...labels, tail]);
}

/** A name at `offset`, following compression pointers (at most 64); null if malformed. */
function readName(msg: Buffer, offset: number): { name: string; next: number } | null {
  const labels: string[] = [];
  let at = offset;
  let next = -1;
  for (let jumps = 0; at < msg.length && jumps <= 64;) {
    const length = msg[at];
    if (length === 0) {
      const name = labels.join(".").toLowerCase();
      return name.length <= 253 ? { name, next: next < 0 ? at + 1 : next } : null;
    }
    if (length >= 0xc0) {
      if (at + 1 >= msg.length) return null;
      if (next < 0) next = at + 2;
      at = ((length & 0x3f) << 8) | msg[at + 1];
      jumps++;
    } else if (length <= 63 && at + 1 + length <= msg.length) {
      labels.push(msg.toString("latin1", at + 1, at + 1 + length));
      at += 1 + length;
    } else return null;
  }
  return null;
}

/** 16 bytes as RFC 5952 text: lower case, the longest run of zero groups as `::`. */
function ipv6Text(bytes: Buffer): string {
  const groups = Array.from({ length: 8 }, (_, i) => bytes.readUInt16BE(i * 2).toString(16));
  let best = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; i++) {
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLength) [best, bestLength] = [i, j - i];
  }
  if (best < 0) return groups.join(":");
  return `${groups.slice(0, best).join(":")}::${groups.slice(best + bestLength).join(":")}`;
}

type Answer = { rcode: number; truncated: boolean; records: (MxRecord | string)[] };

/** The answer to our question, or null (not ours: another ID or question), or "malformed". */
function parseAnswer(
  msg: Buffer,
  id: number,
  name: string,
  type: number,
): Answer | null | "malformed" {
  if (msg.length < 12 || msg.readUInt16BE(0) !== id || !(msg[2] & 0x80)) return null;
  const question = readName(msg, 12);
  if (msg.readUInt16BE(4) !== 1 || !question || question.next + 4 > msg.length) return null;
  if (question.name !== name || msg.readUInt16BE(question.next) !== type) return null;
  const rcode = msg[3] & 0x0f;
  const truncated = (msg[2] & 0x02) !== 0;
  const rrs: { owner: string; type: number; start: number; length: number }[] = [];
  let at = question.next + 4;
  for (let i = msg.readUInt16BE(6); i > 0; i--) {
    const owner = readName(msg, at);
    if (!owner || owner.next + 10 > msg.length) return "malformed";
    const length = msg.readUInt16BE(owner.next + 8);
    const start = owner.next + 10;
    if (start + length > msg.length) return "malformed";
    rrs.push({ owner: owner.name, type: msg.readUInt16BE(owner.next), start, length });
    at = start + length;
  }
  const chain = new Set([name]); // the name and its aliases (CNAME answers, RFC 1034 §3.6.2)
  for (let hops = 0; hops < 8; hops++) {
    const alias = rrs.find((rr) => rr.type === TYPE_CODES.CNAME && chain.has(rr.owner));
    const target = alias && readName(msg, alias.start)?.name;
    if (!target || chain.has(target)) break;
    chain.add(target);
  }
  const records: (MxRecord | string)[] = [];
  for (const rr of rrs.filter((rr) => rr.type === type && chain.has(rr.owner))) {
    if (type === TYPE_CODES.A && rr.length === 4) {
      records.push([...msg.subarray(rr.start, rr.start + 4)].join("."));
    } else if (type === TYPE_CODES.AAAA && rr.length === 16) {
      records.push(ipv6Text(msg.subarray(rr.start, rr.start + 16)));
    } else if (type === TYPE_CODES.MX && rr.length >= 3) {
      const exchange = readName(msg, rr.start + 2);
      if (!exchange) return "malformed";
      records.push({ preference: msg.readUInt16BE(rr.start), exchange: exchange.name });
    } else return "malformed";
  }
  return { rcode, truncated, records };
}

/**
 * Ask `resolver` one question over UDP: sent again after a third and two
 * thirds of `timeoutMs` if no answer came, given up at `timeoutMs`. Answers
 * count only with our random ID, from the resolver's port, to our question.
 */
export function lookup(
  resolver: Resolver,
  name: string,
  type: RecordType,
  timeoutMs: number,
): Promise<Lookup> {
  const begun = Date.now();
  const id = randomInt(0x10000);
  const packet = dnsQuery(id, name, TYPE_CODES[type]);
  return new Promise((resolve) => {
    const socket = createSocket(isIPv6(resolver.host) ? "udp6" : "udp4");
    let done = false;
    let sent = 0;
    const finish = (status: string, records: (MxRecord | string)[] = []) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearInterval(again);
      socket.close();
      resolve({ name, type, status, records, ms: Date.now() - begun });
    };
    const send = () => {
      if (done || sent++ >= 3) return;
      socket.send(packet, resolver.port, resolver.host, (error) => {
        if (error) finish(`error ${(error as NodeJS.ErrnoException).code ?? error.message}`);
      });
    };
    socket.on("error", (error: NodeJS.ErrnoException) => finish(`error ${error.code}`));
    socket.on("message", (msg: Buffer, from: { port: number }) => {
      if (from.port !== resolver.port) return;
      const answer = parseAnswer(msg, id, name, TYPE_CODES[type]);
      if (answer === "malformed") finish("malformed");
      else if (answer?.truncated) finish("truncated"); // RFC 1035 §4.2.1: TC; no TCP here
      else if (answer) finish(RCODES[answer.rcode] ?? `RCODE ${answer.rcode}`, answer.records);
    });
    const timer = setTimeout(() => finish("time-out"), timeoutMs);
    const again = setInterval(send, timeoutMs / 3);
    send();
  });
}

/** The first `nameserver` of /etc/resolv.conf, read only where that needs no prompt. */
export function systemResolver(): Resolver | string {
  const deno = (globalThis as unknown as { Deno?: DenoPermissions }).Deno;
  const path = "/etc/resolv.conf";
  if (deno && deno.permissions.querySync({ name: "read", path }).state !== "granted") {
    return `Deno may not read ${path} (no --allow-read): give --resolver HOST[:PORT] ` +
      `(e.g. --resolver 192.0.2.53), or run deno with --allow-read=${path}`;
  }
  let text: string;
  try {
    text = readFileSync(path, "latin1");
  } catch (error) {
    return `cannot read ${path} (${(error as NodeJS.ErrnoException).code}): give --resolver`;
  }
  const server = /^\s*nameserver\s+(\S+)/m.exec(text)?.[1];
  return server && isIP(server.replace(/%.*$/, ""))
    ? { host: server, port: 53 }
    : `no nameserver in ${path}: give --resolver HOST[:PORT]`;
}
type DenoPermissions = {
  permissions: { querySync(d: { name: string; path: string }): { state: string } };
};

// ---------------------------------------------------------------------------
// The domain check: every path a sender can take to a domain (RFC 5321 §5.1),
// each checked with the host check.
// ---------------------------------------------------------------------------

/** How the domain's MX records route mail (RFC 5321 §5.1, RFC 7505 §3). */
export type Routing = "null MX" | "null MX mixed" | "MX" | "implicit MX" | "unknown";

/** One way a sender can go: an MX host (or the domain itself) at one address. */
export interface Path {
  readonly host: string;
  /** The MX preference; null for the implicit MX. */
  readonly preference: number | null;
  /** `address:port`, or null when the host has no usable address. */
  readonly target: string | null;
  readonly action: Action;
  readonly verdict: string;
  readonly exit: number;
  /** The host check of this address; null when none was made. */
  readonly report: ProbeReport | null;
}
export interface DomainReport {
  readonly domain: string;
  readonly resolver: string;
  readonly port: number;
  readonly routing: Routing;
  readonly mx: readonly MxRecord[];
  readonly verdict: string;
  readonly exit: number;
  readonly warnings: readonly string[];
  readonly paths: readonly Path[];
  readonly lookups: readonly Lookup[];
}
export interface DomainOptions {
  readonly domain: string;
  readonly resolver: Resolver;
  /** @default 25 */
  readonly port?: number;
  /** @default `postmaster@<domain>` */
  readonly rcpt?: string;
  /** Bounds each DNS lookup and each address's host check. @default 10_000 */
  readonly timeoutMs?: number;
}

const GREETING_WARNING = "Postfix and OpenSMTPD will queue for days, not bounce, on the 521 " +
  "greeting of PATHS (Postfix's default smtp_skip_5xx_greeting = yes): run smtp521 with " +
  "--mode rcpt there, or publish a null MX (RFC 7505)";

/** Paths of one host: its A and AAAA lookups, then the host check on each address. */
async function hostPaths(
  o: DomainOptions,
  host: string,
  preference: number | null,
  ask: (name: string, type: RecordType) => Promise<Lookup>,
): Promise<Path[]> {
  const port = o.port ?? 25;
  const lookups = await Promise.all([ask(host, "A"), ask(host, "AAAA")]);
  const failed = lookups.filter((l) => !["NOERROR", "NXDOMAIN"].includes(l.status));
  const paths: Path[] = failed.map((l) => ({
    host,
    preference,
    target: null,
    action: "queue",
    verdict: `the ${l.type} lookup for ${host} failed: ${l.status}`,
    exit: EXIT.unreachable,
    report: null,
  }));
  const addresses = lookups.flatMap((l) => l.records as string[]);
  if (!addresses.length && !failed.length) {
    const implicit = preference === null;
    paths.push({
      host,
      preference,
      target: null,
      action: implicit ? "bounce" : "skip",
      verdict: implicit
        ? "no MX and no A or AAAA record: senders bounce (no route), not told why: " +
          "publish a null MX (RFC 7505)"
        : "this MX host has no A or AAAA record: senders skip it (RFC 5321 section 5.1)",
      exit: EXIT.wrong,
      report: null,
    });
  }
  const rcpt = o.rcpt ?? `postmaster@${o.domain}`;
  const reports = await Promise.all(
    addresses.map((address) => probeHost({ host: address, port, rcpt, timeoutMs: o.timeoutMs })),
  );
  for (const report of reports) {
    const { target, action, verdict, exit } = report;
    paths.push({ host, preference, target, action, verdict, exit, report });
  }
  return paths;
}

/** Check a domain the way senders see it (RFC 5321 §5.1, RFC 7505); never rejects. */
export async function probeDomain(o: DomainOptions): Promise<DomainReport> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const lookups: Lookup[] = [];
  const ask = async (name: string, type: RecordType) => {
    const result = await lookup(o.resolver, name, type, timeoutMs);
    lookups.push(result);
    return result;
  };
  const base = {
    domain: o.domain,
    resolver: hostPort(o.resolver.host, o.resolver.port),
    port: o.port ?? 25,
  };
  const report = (
    routing: Routing,
    mx: MxRecord[],
    exit: number,
    verdict: string,
    paths: Path[] = [],
    warnings: string[] = [],
  ): DomainReport => ({ ...base, routing, mx, verdict, exit, warnings, paths, lookups });

  const answer = await ask(o.domain, "MX");
  if (answer.status === "NXDOMAIN") {
    return report("unknown", [], EXIT.unreachable, `${o.domain} does not exist (NXDOMAIN)`);
  }
  if (answer.status !== "NOERROR") {
    return report("unknown", [], EXIT.unreachable, `the MX lookup failed: ${answer.status}`);
  }
  const mx = (answer.records as MxRecord[]).toSorted((a, b) =>
    a.preference - b.preference || a.exchange.localeCompare(b.exchange)
  );
  const nulls = mx.filter((record) => record.exchange === "");
  if (mx.length === 1 && nulls.length === 1) {
    return report(
      "null MX",
      mx,
      EXIT.refuses,
      "refuses mail: a null MX (RFC 7505 section 3): senders do not connect, they bounce at once",
    );
  }
  const routing: Routing = nulls.length ? "null MX mixed" : mx.length ? "MX" : "implicit MX";
  const hosts = mx.length ? mx.filter((record) => record.exchange !== "") : [
    { preference: null, exchange: o.domain }, // RFC 5321 §5.1: no MX, the domain is the host
  ];
  const paths = (await Promise.all(hosts.map(({ preference, exchange }) => {
    const host = checkedDomain(exchange);
    return host && !host.startsWith("[") ? hostPaths(o, host, preference, ask) : [{
      host: printable(exchange),
      preference,
      target: null,
      action: "unknown" as const,
      verdict: "the MX host is not a domain name (RFC 5321 section 2.3.5)",
      exit: EXIT.wrong,
      report: null,
    }];
  }))).flat();

  const problems: string[] = [];
  if (nulls.length) {
    problems.push("a null MX mixed with other MX records (RFC 7505 section 3 forbids it)");
  }
  const count = (test: (path: Path) => boolean) => paths.filter(test).length;
  const reached = count((p) => p.report !== null && p.exit !== EXIT.unreachable);
  const down = count((p) => p.report !== null && p.exit === EXIT.unreachable);
  const bad = count((p) => p.exit === EXIT.wrong);
  if (bad) problems.push(`${bad} of ${paths.length} paths do not refuse mail`);
  // An address that cannot be reached while another one answers is a fault, not bad luck:
  // a sender that reaches only it (IPv6-only, say) queues the mail for days.
  if (down && reached) {
    problems.push(`${down} of ${paths.length} paths cannot be reached: senders there queue`);
  }
  const greet = paths.filter((p) => p.action === "bounce-or-queue" && p.exit === EXIT.refuses);
  const warnings: string[] = [];
  if (greet.length) {
    const where = greet.map((p) => `${p.host} ${p.target}`).join(", ");
    warnings.push(GREETING_WARNING.replace("PATHS", where));
  }
  if (problems.length) {
    const verdict = `does NOT refuse mail on every path: ${problems.join("; ")}`;
    return report(routing, mx, EXIT.wrong, verdict, paths, warnings);
  }
  const failed = count((p) => p.exit === EXIT.unreachable);
  if (failed) {
    const why = down === paths.length
      ? "no host can be reached"
      : `${failed} of ${paths.length} paths could not be checked (DNS)`;
    return report(routing, mx, EXIT.unreachable, `cannot tell: ${why}`, paths, warnings);
  }
  const how = greet.length ? "; some senders queue (see the warning)" : "; senders bounce at once";
  const verdict = `refuses mail: every path ends in a permanent refusal${how}`;
  return report(routing, mx, EXIT.refuses, verdict, paths, warnings);
}

// ---------------------------------------------------------------------------
// The program: flags, text output, exit codes.
// ---------------------------------------------------------------------------

export const USAGE = `probe.ts: does a host, or a domain, refuse mail the RFC 1846 way (521)?

usage: probe.ts HOST[:PORT] [--rcpt USER@DOMAIN] [--timeout S] [--json]
       probe.ts --domain NAME [--port N] [--resolver HOST[:PORT]] [--rcpt USER@DOMAIN]
                [--timeout S] [--json]

  HOST[:PORT]            one host: mx.example, 192.0.2.1:2525, [2001:db8::1]:25
  --domain NAME          every path a sender can take to NAME: its MX hosts (or, with
                         no MX, NAME's own A/AAAA) on every address; a null MX alone
                         needs no connection
  --port N               with --domain: the SMTP port tried on every host (default 25)
  --resolver HOST[:PORT] with --domain: the DNS server (default: the first nameserver in
                         /etc/resolv.conf; Deno reads it only with --allow-read)
  --rcpt USER@DOMAIN     the recipient after a 220 greeting (default postmaster@ the
                         name in the greeting, or postmaster@NAME with --domain)
  --timeout S            bounds each host's whole check and each DNS lookup (default 10)
  --json                 one JSON object instead of text
  -h, --help             this text

exit: 0 refuses mail on every path (or a null MX alone); 1 does not (accepts, defers,
      answers something else, wrong MX records); 2 usage; 3 cannot resolve or reach
`;

const FLAGS = {
  domain: { type: "string" },
  port: { type: "string" },
  resolver: { type: "string" },
  rcpt: { type: "string" },
  timeout: { type: "string", default: "10" },
  json: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} as const;

type UsageError = { readonly error: string };
const isError = (value: unknown): value is UsageError =>
  typeof value === "object" && value !== null && "error" in value;

const TARGET = /^\[([^\]]+)\](?::(\d{1,5}))?$|^([^:[\]]+)(?::(\d{1,5}))?$/;

/** `host`, `host:port`, `[IPv6]:port`, `[IPv4]:port` or a bare IPv6 address. */
function target(text: string, flag: string, port: number, ipOnly = false) {
  const parts = isIPv6(text) ? [text, text] : TARGET.exec(text);
  const host = parts?.[1] ?? parts?.[3] ?? "";
  const number = Number(parts?.[2] ?? parts?.[4] ?? port);
  const named = !ipOnly && !!parts?.[3] && !!checkedDomain(host);
  if ((named || isIP(host)) && !host.includes("%") && number >= 1 && number <= 65535) {
    return { host, port: number };
  }
  const example = ipOnly ? "192.0.2.53, [::1]:5353" : "mx.example, [::1]:2525";
  const what = ipOnly ? "an IP address" : "HOST";
  const error = `${flag}"${text}" is not ${what}[:PORT] with a port from 1 to 65535`;
  return { error: `${error} (e.g. ${example})` };
}

/** `--rcpt`: an RFC 5321 §4.1.2 dot-string local part, then a domain or address literal. */
function recipient(text: string): string | UsageError {
  const at = text.lastIndexOf("@");
  const domain = checkedDomain(text.slice(at + 1));
  return at > 0 && /^[\w!#$%&'*+/=?^`{|}~.-]{1,64}$/.test(text.slice(0, at)) && domain
    ? `${text.slice(0, at)}@${domain}`
    : { error: `--rcpt: "${text}" is not USER@DOMAIN (e.g. postmaster@nomail.example)` };
}

function seconds(value: string): number | UsageError {
  const s = /^\d+(\.\d+)?$/.test(value) ? Number(value) : NaN;
  return s >= 0.1 && s <= 86_400
    ? Math.round(s * 1000)
    : { error: `--timeout: "${value}" must be seconds from 0.1 to 86400` };
}

type Parsed =
  | { form: "host"; json: boolean; options: ProbeOptions }
  | { form: "domain"; json: boolean; options: DomainOptions };

export function parseProbeArgs(args: readonly string[]): Parsed | "help" | UsageError {
  let parsed;
  try {
    parsed = parseArgs({ args: [...args], options: FLAGS, strict: true, allowPositionals: true });
  } catch (error) {
    const flag = /'([^' ]+)/.exec((error as Error).message)?.[1] ?? "probe.ts";
    const code = (error as NodeJS.ErrnoException).code;
    const why = code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" ? "unknown flag" : "needs a value";
    return { error: `${flag}: ${why}; see --help` };
  }
  const { values, positionals } = parsed;
  if (values.help) return "help";
  const timeoutMs = seconds(values.timeout);
  const rcpt = values.rcpt === undefined ? undefined : recipient(values.rcpt);
  if (isError(timeoutMs)) return timeoutMs;
  if (isError(rcpt)) return rcpt;
  const json = values.json;
  if (values.domain === undefined) {
    for (const flag of ["port", "resolver"] as const) {
      if (values[flag] !== undefined) {
        return { error: `--${flag}: only with --domain (a host is HOST[:PORT])` };
      }
    }
    if (positionals.length !== 1) {
      return { error: "give one HOST[:PORT] or --domain NAME (e.g. probe.ts mx.example:25)" };
    }
    const where = target(positionals[0], "", 25);
    return isError(where) ? where : { form: "host", json, options: { ...where, rcpt, timeoutMs } };
  }
  if (positionals.length) return { error: `--domain: give no HOST too (got "${positionals[0]}")` };
  const domain = checkedDomain(values.domain);
  if (!domain || domain.startsWith("[")) {
    return { error: `--domain: "${values.domain}" is not a domain name (e.g. nomail.example)` };
  }
  const port = values.port === undefined ? 25 : Number(values.port);
  if (!/^\d{1,5}$/.test(values.port ?? "25") || port < 1 || port > 65535) {
    return { error: `--port: "${values.port}" must be a whole number from 1 to 65535` };
  }
  let resolver: Resolver | string | UsageError;
  if (values.resolver === undefined) resolver = systemResolver();
  else resolver = target(values.resolver, "--resolver: ", 53, true);
  if (typeof resolver === "string") return { error: `--domain: ${resolver}` };
  if (isError(resolver)) return resolver;
  return { form: "domain", json, options: { domain, port, resolver, rcpt, timeoutMs } };
}

function hostText(r: ProbeReport): string {
  let quit = r.quit === null ? "not sent" : printable(r.quit);
  if (r.quit === null && r.greeting) quit += ": the server had closed";
  return [
    `probe:    ${r.target}`,
    `greeting: ${r.greeting === null ? "none" : printable(r.greeting)}`,
    `mode:     ${r.mode}`,
    `name:     ${r.name ?? "none"}`,
    `quit:     ${quit}`,
    `senders:  ${r.senders}`,
    `verdict:  ${r.verdict} (exit ${r.exit})`,
  ].join("\n") + "\n";
}

/** One screen, the verdict first: at most 12 paths (all of them are in --json). */
function domainText(r: DomainReport): string {
  const records = r.routing === "implicit MX"
    ? "none: the implicit MX, the domain's own A/AAAA (RFC 5321 section 5.1)"
    : r.mx.map((m) => `${m.preference} ${m.exchange || "."}`).join(", ") || "unknown";
  const odd = r.lookups.filter((l) => l.status !== "NOERROR");
  const dns = odd.length
    ? odd.map((l) => `${l.type} ${l.name}: ${l.status}`).join(", ")
    : `${r.lookups.length} lookup${r.lookups.length > 1 ? "s" : ""}, all NOERROR`;
  const lines = [
    `verdict:  ${r.verdict} (exit ${r.exit})`,
    `domain:   ${r.domain}, SMTP port ${r.port}, DNS ${r.resolver} (${dns})`,
    `mx:       ${records}`,
  ];
  for (const [i, p] of r.paths.slice(0, 12).entries()) {
    const where = p.target ? `${p.host} ${p.target}` : p.host;
    const mode = p.report && p.report.mode !== "none" ? ` ${p.report.mode} mode` : "";
    const head = i ? "          " : "paths:    ";
    const why = p.verdict.replace(/^refuses mail per RFC 1846\/RFC 7504: /, "");
    lines.push(`${head}${ACTION_TEXT[p.action].padEnd(15)} ${where}${mode}: ${why}`);
  }
  if (r.paths.length > 12) lines.push(`          and ${r.paths.length - 12} more (see --json)`);
  for (const warning of r.warnings) lines.push(`warning:  ${warning}`);
  return lines.join("\n") + "\n";
}

/** Write, then resolve with the exit code once written (a pipe keeps all of it). */
const write = (stream: NodeJS.WriteStream, text: string, code: number) =>
  new Promise<number>((resolve) => stream.write(text, () => resolve(code)));

/** The program; resolves with the exit code. */
export async function main(args: readonly string[]): Promise<number> {
  const parsed = parseProbeArgs(args);
  if (parsed === "help") return await write(process.stdout, USAGE, 0);
  if (isError(parsed)) {
    return await write(process.stderr, `probe.ts: ${parsed.error}\n`, EXIT.usage);
  }
  if (parsed.form === "host") {
    const report = await probeHost(parsed.options);
    const text = parsed.json ? `${asciiJson(report)}\n` : hostText(report);
    return await write(process.stdout, text, report.exit);
  }
  const report = await probeDomain(parsed.options);
  const text = parsed.json ? `${asciiJson(report)}\n` : domainText(report);
  return await write(process.stdout, text, report.exit);
}

if (import.meta.main) main(process.argv.slice(2)).then((code) => process.exit(code));
