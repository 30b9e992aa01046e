#!/usr/bin/env -S deno run --allow-net --no-prompt
/**
 * smtp521: an SMTP server for hosts that never receive mail.
 *
 * A host with nothing on port 25 makes senders queue misaddressed mail for
 * days (a refused connection is a temporary failure). smtp521 answers with a
 * permanent "521 <host> does not accept mail" instead, so the sender returns
 * the message at once with a clear reason.
 *
 *   RFC 1846  SMTP 521 Reply Code (the modes below: §3, §4.1, §4.2)
 *   RFC 7504  SMTP 521 and 556 Reply Codes (§3: 521 greeting, 556 at RCPT)
 *   RFC 5321  SMTP (line and time-out limits, §4.5.3)
 *   RFC 7505  Null MX (publish it too, where you control DNS)
 *
 * Usage (one file, no dependencies; Deno, Node >= 22.18 or Bun):
 *
 *   deno run --allow-net smtp521.ts [--mode greet|close|rcpt] [flags]
 *   node smtp521.ts --port 2525 --hostname ntp1.example
 *   bun smtp521.ts --stdio                      # from inetd / systemd Accept=yes
 *   deno run --allow-net smtp521.ts probe host.example[:25]
 *
 * As a library: `createSession` and `receive` are the protocol as a pure
 * state machine (bytes in, replies and "close now" out); `serve` runs it on
 * TCP.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { isIP, isIPv4, isIPv6 } from "node:net";
import type { AddressInfo, Server } from "node:net";
import { createServer, Socket } from "node:net";
import { fstatSync, readFileSync, write } from "node:fs";
import { hostname as systemHostname } from "node:os";
import process from "node:process";
import { EventEmitter } from "node:events";
import { Duplex } from "node:stream";
import { clearInterval, clearTimeout, setInterval, setTimeout } from "node:timers";
import { parseArgs } from "node:util";

export const VERSION = "1.0.0";

// ---------------------------------------------------------------------------
// Reply table. Every byte smtp521 ever sends is built here, from the server's
// name (SPEC §3) and, for RCPT only, a recipient domain that passed
// `checkedDomain`. Nothing else a client sends can reach a reply.
// ---------------------------------------------------------------------------

/** The fixed replies for one server name, CRLF-terminated. */
export interface Replies {
  /** RFC 1846 §4.1 greeting, and the answer to every line in `greet` mode. */
  readonly refuse: string;
  /** RFC 5321 §4.1.1.10: QUIT. */
  readonly closing: string;
  /** `rcpt` mode greeting (RFC 1846 §3: a relay greets normally). */
  readonly ready: string;
  /** HELO/EHLO: one line, so no extension (PIPELINING, STARTTLS, AUTH) is offered. */
  readonly hello: string;
  readonly ok: string;
  /** RFC 5321 §3.6.2: a recipient outside `--domains`; never an open relay. */
  readonly relayDenied: string;
  /** RFC 5321 §3.3: DATA when every RCPT was refused. No reply is ever 354. */
  readonly noRecipients: string;
  readonly badSequence: string;
  readonly badSyntax: string;
  readonly notImplemented: string;
  readonly unknownCommand: string;
  /** RFC 5321 §4.5.3.1.6 text line over 1000 octets, in `rcpt` mode. */
  readonly lineTooLong: string;
}

/** RFC 1846 §3, RFC 7504 §3: the RCPT refusal naming the recipient's domain. */
export function rcptRefusal(code: RcptCode, domain: string): string {
  return `${code} ${domain} does not accept mail\r\n`;
}

/**
 * `make(key)`, remembered for at most 64 keys. A server has a handful of names
 * (one, or one per local address), but anyone who can reach many local
 * addresses (127.0.0.0/8, a routed IPv6 prefix) must not grow it without bound.
 */
function boundedCache<V>(make: (key: string) => V): (key: string) => V {
  const cache = new Map<string, V>();
  return (key) => {
    let value = cache.get(key);
    if (value === undefined) {
      if (cache.size >= 64) cache.clear();
      cache.set(key, value = make(key));
    }
    return value;
  };
}

/** The replies for a server name. */
export const repliesFor: (name: string) => Replies = boundedCache(buildReplies);

function buildReplies(name: string): Replies {
  return Object.freeze({
    refuse: `521 ${name} does not accept mail\r\n`,
    closing: `221 ${name} closing connection\r\n`,
    ready: `220 ${name} ESMTP refuses all mail\r\n`,
    hello: `250 ${name}\r\n`,
    ok: "250 OK\r\n",
    relayDenied: "550 relaying denied\r\n",
    noRecipients: "554 no valid recipients\r\n",
    badSequence: "503 bad sequence of commands\r\n",
    badSyntax: "501 syntax error in parameters or arguments\r\n",
    notImplemented: "502 command not implemented\r\n",
    unknownCommand: "500 command not recognized\r\n",
    lineTooLong: "500 line too long\r\n",
  });
}

// ---------------------------------------------------------------------------
// Names (SPEC §3). A reply may only ever name a checked domain or literal.
// ---------------------------------------------------------------------------

/** RFC 5321 §4.1.2 Domain: LDH labels of 1-63 octets, 253 octets in all. */
const DOMAIN = /^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/i;

/**
 * A well-formed domain (lower-cased, one trailing dot dropped) or address
 * literal (RFC 5321 §4.1.3, `[192.0.2.1]`, `[IPv6:2001:db8::1]`); else null.
 */
export function checkedDomain(text: string): string | null {
  if (text.startsWith("[") && text.endsWith("]")) {
    const inner = text.slice(1, -1);
    if (isIPv4(inner)) return text;
    // RFC 5321 §4.1.3 IPv6-addr has no zone id; isIPv6 takes `fe80::1%any text`.
    const v6 = /^ipv6:([0-9a-f:.]{2,45})$/i.exec(inner);
    return v6 && isIPv6(v6[1]) ? `[IPv6:${v6[1].toLowerCase()}]` : null;
  }
  const name = text.endsWith(".") ? text.slice(0, -1) : text;
  return name.length <= 253 && DOMAIN.test(name) ? name.toLowerCase() : null;
}

/** An IP address as RFC 5321 §4.1.3 writes it; IPv4-mapped IPv6 as IPv4. */
export function addressLiteral(ip: string): string {
  const plain = plainAddress(ip);
  return isIPv6(plain) ? `[IPv6:${plain}]` : `[${plain}]`;
}

/** `::ffff:192.0.2.1` -> `192.0.2.1`, `fe80::1%eth0` -> `fe80::1`. */
function plainAddress(ip: string): string {
  if (!ip.includes(":")) return ip; // IPv4: nothing to strip, and no regex per connection
  const unscoped = ip.replace(/%.*$/, "");
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(unscoped);
  return mapped ? mapped[1] : unscoped;
}

/**
 * What the per-address limit counts: an IPv4 address, or the /64 of an IPv6
 * address (RFC 4291 §2.5.4: one host, or one customer, holds a whole /64).
 */
export function clientNetwork(ip: string): string {
  if (!ip.includes(":")) return ip;
  const [head, tail] = ip.split("::");
  const groups = head ? head.split(":") : [];
  if (tail !== undefined && groups.length < 4) {
    const rest = tail ? tail.split(":") : [];
    const width = rest.length + (tail.includes(".") ? 1 : 0); // a dotted quad is two groups
    while (groups.length < 8 - width && groups.length < 4) groups.push("0");
    groups.push(...rest);
  }
  return groups.slice(0, 4).map((group) => parseInt(group, 16).toString(16)).join(":") + "::/64";
}

/**
 * `--domains a.example,.b.example`: a name, or with a leading dot every name
 * under it but not itself (as in Postfix tables).
 */
export interface DomainList {
  readonly names: ReadonlySet<string>;
  readonly parents: ReadonlySet<string>;
}

export function parseDomainList(text: string): DomainList | string {
  const names = new Set<string>();
  const parents = new Set<string>();
  for (const entry of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const under = entry.startsWith(".");
    const domain = checkedDomain(under ? entry.slice(1) : entry);
    if (!domain || (under && domain.startsWith("["))) return entry;
    (under ? parents : names).add(domain);
  }
  return names.size + parents.size ? { names, parents } : text;
}

function listed(list: DomainList, domain: string): boolean {
  if (list.names.has(domain)) return true;
  for (let dot = domain.indexOf("."); dot >= 0; dot = domain.indexOf(".", dot + 1)) {
    if (list.parents.has(domain.slice(dot + 1))) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Session core: the protocol as a pure state machine, with no sockets and no
// timers (after h11). The transport feeds it bytes; it answers with the text
// to send and, when the session is over, why.
// ---------------------------------------------------------------------------

export type Mode = "greet" | "close" | "rcpt";
export type RcptCode = 521 | 556;

/** Why a session ended (SPEC §6), as logged. */
export type EndReason =
  | "quit"
  | "closed"
  | "timeout"
  | "limit"
  | "overload"
  | "too-long"
  | "forbidden"
  | "reset"
  | "client-closed"
  | "shutdown";

export interface SessionConfig {
  readonly mode: Mode;
  /** The name in replies (SPEC §3), already checked. */
  readonly name: string;
  /** Lines a session may send; the last one is answered, then the close. */
  readonly maxCommands: number;
  /** `rcpt` mode: 521 (RFC 1846) or 556 (RFC 7504) for a refused recipient. */
  readonly rcptCode: RcptCode;
  /** `rcpt` mode: the domains refused with `rcptCode`; null refuses every domain. */
  readonly domains: DomainList | null;
}

/** What the transport must do after feeding the core. */
export interface Step {
  /** Replies to send, in order; "" for none. */
  readonly send: string;
  /** Complete lines taken in (each resets the idle time-out). */
  readonly lines: number;
  /** Set once: send, then close (lingering, SPEC §4) for this reason. */
  readonly end: EndReason | null;
}

/**
 * One session's state. A plain object, read and changed only by `receive`:
 * a held connection costs these few fields, not a closure per operation
 * (closures cost 1.8 KB of heap per connection here; bench/RESULTS.md).
 */
export interface Session {
  readonly config: SessionConfig;
  readonly replies: Replies;
  /** The first step, taken as soon as the connection is accepted. */
  readonly greeting: Step;
  /** The start of a line whose LF has not come yet: under MAX_LINE octets. */
  partial: Buffer | null;
  /** Complete lines so far. */
  received: number;
  /** Once set, every later byte is ignored. */
  ended: boolean;
  /** `rcpt` mode: MAIL was accepted and no RSET or HELO/EHLO has ended it (RFC 5321 §4.1.4). */
  inTransaction: boolean;
}

/** RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
export const MAX_LINE = 1000;
const LF = 10;
const CR = 13;
const SPACE = 32;
const TAB = 9;
const TLS_HANDSHAKE = 0x16;
/** A cross-protocol probe (SPEC §4): an HTTP request line is never SMTP. */
const HTTP_REQUEST = /^(?:(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH)(?: |$)|[A-Z]+ \S+ HTTP\/\d)/;
const QUIT = /^quit$/i;
const NOTHING: Step = Object.freeze({ send: "", lines: 0, end: null });

type Answer = readonly [reply: string, end: EndReason | null];

export function createSession(config: SessionConfig): Session {
  const replies = repliesFor(config.name);
  if (config.mode === "rcpt") return newSession(config, replies, { send: replies.ready, lines: 0, end: null });
  return newSession(config, replies, {
    send: replies.refuse,
    lines: 0,
    end: config.mode === "close" ? "closed" : null,
  });
}

/** SPEC §4: a connection over a limit still hears the 521, then a close. */
export function overloadSession(config: SessionConfig): Session {
  const replies = repliesFor(config.name);
  return newSession(config, replies, { send: replies.refuse, lines: 0, end: "overload" });
}

function newSession(config: SessionConfig, replies: Replies, greeting: Step): Session {
  return { config, replies, greeting, partial: null, received: 0, ended: greeting.end !== null, inTransaction: false };
}

/** Feed received bytes; bytes after the end are ignored. */
export function receive(session: Session, chunk: Uint8Array): Step {
  if (session.ended || chunk.length === 0) return NOTHING;
  if (session.received === 0 && session.partial === null && chunk[0] === TLS_HANDSHAKE) {
    return finish(session, "", 0, "forbidden");
  }
  const bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  let send = "";
  let lines = 0;
  let start = 0;
  for (let lf = bytes.indexOf(LF); lf >= 0; lf = bytes.indexOf(LF, start)) {
    const partial = session.partial;
    if ((partial?.length ?? 0) + lf - start + 1 > MAX_LINE) {
      return finish(session, send + tooLong(session), lines, "too-long");
    }
    const line = lineText(
      partial ? Buffer.concat([partial, bytes.subarray(start, lf)]) : bytes,
      partial ? 0 : start,
      partial ? partial.length + lf - start : lf,
    );
    session.partial = null;
    start = lf + 1;
    lines++;
    if (++session.received === 1 && HTTP_REQUEST.test(line)) return finish(session, send, lines, "forbidden");
    const [reply, end] = session.config.mode === "rcpt" ? rcptAnswer(session, line) : greetAnswer(session, line);
    send += reply;
    if (end) return finish(session, send, lines, end);
    if (session.received >= session.config.maxCommands) return finish(session, send, lines, "limit");
  }
  const rest = bytes.length - start;
  const partial = session.partial;
  if ((partial?.length ?? 0) + rest >= MAX_LINE) return finish(session, send + tooLong(session), lines, "too-long");
  if (rest > 0) {
    session.partial = partial ? Buffer.concat([partial, bytes.subarray(start)]) : Buffer.from(bytes.subarray(start));
  }
  return lines ? { send, lines, end: null } : NOTHING;
}

/**
 * The text of the line in `bytes` from `start` to its LF at `lf`, without one
 * CR and then without trailing blanks (which no command needs), trimmed on the
 * bytes, where a loop is cheapest: no line costs more than its length.
 */
function lineText(bytes: Buffer, start: number, lf: number): string {
  let end = bytes[lf - 1] === CR && lf > start ? lf - 1 : lf;
  while (end > start && (bytes[end - 1] === SPACE || bytes[end - 1] === TAB)) end--;
  return bytes.toString("latin1", start, end);
}

function finish(session: Session, send: string, lines: number, end: EndReason): Step {
  session.ended = true;
  session.partial = null;
  return { send, lines, end };
}

function tooLong(session: Session): string {
  return session.config.mode === "rcpt" ? session.replies.lineTooLong : session.replies.refuse;
}

/** RFC 1846 §4.2 b: every line gets the 521, except QUIT (RFC 7504 §3). */
function greetAnswer({ replies }: Session, line: string): Answer {
  return QUIT.test(line) ? [replies.closing, "quit"] : [replies.refuse, null];
}

/** SMTP verbs smtp521 knows but will not run (RFC 5321 §4.2.4: 502). */
const NOT_IMPLEMENTED = new Set([
  "VRFY",
  "EXPN",
  "HELP",
  "STARTTLS",
  "AUTH",
  "BDAT",
  "ETRN",
  "ATRN",
  "TURN",
  "SEND",
  "SOML",
  "SAML",
]);
const VERB = /^[A-Za-z]{1,8}$/;
/** Parsing by search, not by one pattern: a pattern that fails late backtracks over the whole line. */
const NOT_IN_PATH = /[^\x21-\x3b\x3d\x3f-\x7e]/;
const NOT_PRINTABLE = /[^\x20-\x7e]/;

/** RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its punctuation. */
const MAX_PATH = 256;

/**
 * RFC 5321 §4.1.1.2-3: `FROM:<path>` or `TO:<path>` (one space allowed before
 * `<`, as many clients send it), then optional ESMTP parameters; the path, or null.
 */
function pathArgument(args: string, keyword: "FROM:" | "TO:"): string | null {
  if (args.slice(0, keyword.length).toUpperCase() !== keyword) return null;
  const open = args.charCodeAt(keyword.length) === 0x20 ? keyword.length + 1 : keyword.length;
  const close = args.indexOf(">", open);
  if (args.charCodeAt(open) !== 0x3c || close < 0 || close - open + 1 > MAX_PATH) return null;
  const path = args.slice(open + 1, close);
  const parameters = args.slice(close + 1);
  if (NOT_IN_PATH.test(path) || (parameters && (parameters[0] !== " " || NOT_PRINTABLE.test(parameters)))) {
    return null;
  }
  return path;
}

/**
 * RFC 1846 §3: a relay dialog in which every recipient is refused. The only
 * client text a reply may carry is a recipient domain that `checkedDomain`
 * accepted; anything else in its place is the server's own name.
 */
function rcptAnswer(session: Session, line: string): Answer {
  const { replies } = session;
  const reply = (text: string): Answer => [text, null];
  const space = line.indexOf(" ");
  const word = space < 0 ? line : line.slice(0, space);
  if (!VERB.test(word)) return reply(replies.unknownCommand);
  const verb = word.toUpperCase();
  const args = space < 0 ? "" : line.slice(space + 1);
  switch (verb) {
    case "HELO":
    case "EHLO":
      if (!args) return reply(replies.badSyntax);
      session.inTransaction = false; // RFC 5321 §4.1.4: a new EHLO resets the transaction
      return reply(replies.hello);
    case "MAIL":
      if (pathArgument(args, "FROM:") === null) return reply(replies.badSyntax);
      if (session.inTransaction) return reply(replies.badSequence);
      session.inTransaction = true;
      return reply(replies.ok);
    case "RCPT": {
      if (!session.inTransaction) return reply(replies.badSequence);
      const to = pathArgument(args, "TO:");
      return reply(to ? recipient(session, to) : replies.badSyntax);
    }
    case "DATA":
      if (!session.inTransaction) return reply(replies.badSequence);
      return reply(args ? replies.badSyntax : replies.noRecipients);
    case "RSET":
      if (args) return reply(replies.badSyntax);
      session.inTransaction = false;
      return reply(replies.ok);
    case "NOOP":
      return reply(replies.ok);
    case "QUIT":
      return args ? reply(replies.badSyntax) : [replies.closing, "quit"];
    default:
      return reply(NOT_IMPLEMENTED.has(verb) ? replies.notImplemented : replies.unknownCommand);
  }
}

function recipient({ config, replies }: Session, path: string): string {
  // RFC 5321 §4.1.1.3: a source route `@a,@b:` is ignored; the final domain decides.
  const mailbox = path.startsWith("@") ? path.slice(path.indexOf(":") + 1) : path;
  // RFC 5321 §4.5.1: `<Postmaster>` is this host, which takes no mail either.
  if (/^postmaster$/i.test(mailbox)) return rcptRefusal(config.rcptCode, config.name);
  const at = mailbox.lastIndexOf("@");
  if (at <= 0) return replies.badSyntax;
  const domain = checkedDomain(mailbox.slice(at + 1));
  if (config.domains) {
    return domain && listed(config.domains, domain) ? rcptRefusal(config.rcptCode, domain) : replies.relayDenied;
  }
  return rcptRefusal(config.rcptCode, domain ?? config.name);
}

// ---------------------------------------------------------------------------
// Transports: thin adapters that own sockets, timers and limits and let the
// session core decide every byte sent.
// ---------------------------------------------------------------------------

/** SPEC §4: after the last reply, read and discard this long, then destroy. */
const LINGER_MS = 2000;
/**
 * ...but read no more than this: a client still sending after the last reply
 * is flooding, and discarding its flood at full speed for 2 s churned 10-25 MB
 * of read buffers. What it sends past this waits in the kernel until the close.
 */
const LINGER_BYTES = 64 * 1024;

/** Structured log: an event name, its fields, and when it happened if not now (ms since the epoch) (SPEC §6). */
export type Log = (event: string, fields: Readonly<Record<string, string | number>>, at?: number) => void;

/** A byte stream both ways: a TCP socket, Deno's own connection, or stdin and stdout joined. */
interface Conduit {
  write(text: string): boolean;
  end(): void;
  end(last: string, done: () => void): void;
  destroy(): void;
  pause(): void;
  resume(): void;
  isPaused(): boolean;
  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "end" | "close" | "error", listener: () => void): void;
  once(event: "drain", listener: () => void): void;
}

/**
 * A session on its conduit, as the transport and the deadline sweeper see it.
 * One plain object per connection, found by shared listeners on the conduit:
 * a held connection costs these fields, not a closure per event.
 */
interface Conversation {
  readonly conduit: Conduit;
  readonly session: Session;
  readonly owner: Owner;
  /** When the sweeper acts: the idle or whole-life deadline, then the end of the linger. */
  at: number;
  /** The place in the sweeper's list. */
  slot: number;
  lines: number;
  end: EndReason | null;
  lingering: boolean;
  /** Bytes read and discarded while lingering. */
  discarded: number;
  /** For the owner's log line and limits: when it began, the client's address and port, over a limit or not. */
  readonly started: number;
  readonly ip: string;
  readonly port: number;
  readonly over: boolean;
}

/** What the conversations of one listener (or one stdio session) share. */
interface Owner {
  readonly idleMs: number;
  readonly maxDurationMs: number;
  readonly sweeper: Sweeper;
  closed(conversation: Conversation, end: EndReason): void;
}

/**
 * Every session's time-out on one interval timer, not a timer each: a
 * Timeout costs about 2 KB per connection on Deno. It runs only while a
 * session is open, so a finished stdio session lets the process exit.
 * The open sessions are an array with swap-remove, not a Set: under churn a
 * Set rehashes every few sessions, and V8 links each old table to the next,
 * entries and all, which kept finished sockets alive through scavenges.
 */
function deadlineSweeper(timeoutMs: number) {
  const periodMs = Math.max(20, Math.min(timeoutMs, LINGER_MS) / 10); // 200 ms at the defaults
  const open: Conversation[] = [];
  let timer: ReturnType<typeof setInterval> | undefined;
  const sweep = () => {
    const now = Date.now();
    // Backwards: a session that expires may leave at once, moving the last one into its slot.
    for (let i = open.length - 1; i >= 0; i--) if (open[i]?.at <= now) expire(open[i]);
    if (open.length === 0) timer = void clearInterval(timer);
  };
  const add = (conversation: Conversation) => {
    conversation.slot = open.push(conversation) - 1;
    timer ??= setInterval(sweep, periodMs);
  };
  const remove = (conversation: Conversation) => {
    const last = open.pop()!;
    if (last !== conversation) open[last.slot = conversation.slot] = last;
  };
  /** Close every open session now, for this reason. */
  const stopAll = (reason: EndReason) => [...open].forEach((conversation) => stop(conversation, reason));
  return { add, remove, stopAll };
}
type Sweeper = ReturnType<typeof deadlineSweeper>;

/**
 * Run one session over a conduit: write what the core says, pause reading
 * while the peer does not read, keep the idle time-out from the last complete
 * line (RFC 5321 §4.5.3.2.7), and close lingering (SPEC §4).
 */
function converse(
  conduit: Conduit,
  session: Session,
  owner: Owner,
  peer: { ip: string; port: number; over: boolean } = { ip: "", port: 0, over: false },
): void {
  const started = Date.now();
  const conversation: Conversation = {
    conduit,
    session,
    owner,
    at: started + Math.min(owner.idleMs, owner.maxDurationMs),
    slot: -1,
    lines: 0,
    end: null,
    lingering: false,
    discarded: 0,
    started,
    ip: peer.ip,
    port: peer.port,
    over: peer.over,
  };
  (conduit as Carrier)[CONVERSATION] = conversation;
  owner.sweeper.add(conversation);
  conduit.on("data", onData);
  // A TCP socket ends its own side when the client's FIN comes (allowHalfOpen is
  // off) and then closes; stdin and stdout joined must be told. A listener fewer
  // saves about 1 µs per session.
  if (!(conduit instanceof Socket)) conduit.on("end", onEnd);
  conduit.on("error", onError);
  conduit.on("close", onClose);
  take(conversation, session.greeting);
}

/** The conversation rides on its conduit, where the shared listeners find it as `this`. */
const CONVERSATION = Symbol("smtp521.conversation");
type Carrier = Conduit & { [CONVERSATION]: Conversation };

function onData(this: Carrier, chunk: Uint8Array): void {
  const conversation = this[CONVERSATION];
  if (!conversation.lingering) take(conversation, receive(conversation.session, chunk));
  else if ((conversation.discarded += chunk.length) > LINGER_BYTES) this.pause();
}
function onEnd(this: Carrier): void {
  linger(this[CONVERSATION], "client-closed");
}
function onError(this: Carrier): void {
  stop(this[CONVERSATION], "reset");
}
function onClose(this: Carrier): void {
  const conversation = this[CONVERSATION];
  conversation.owner.sweeper.remove(conversation);
  // No reason by now: the client's FIN ended it (errors and our own closes name theirs).
  conversation.owner.closed(conversation, conversation.end ??= "client-closed");
}
function onDrain(this: Conduit): void {
  this.resume();
}

function take(conversation: Conversation, step: Step): void {
  const { conduit } = conversation;
  conversation.lines += step.lines;
  if (step.send && !conduit.write(step.send) && !step.end) {
    conduit.pause(); // a pipelining peer that does not read is not read either
    conduit.once("drain", onDrain);
  }
  if (step.end) linger(conversation, step.end);
  else if (step.lines) {
    // RFC 5321 §4.5.3.2.7: the idle time-out restarts with each line, but never
    // past the session's whole life, so one line every few minutes cannot hold a slot.
    const { idleMs, maxDurationMs } = conversation.owner;
    conversation.at = Math.min(Date.now() + idleMs, conversation.started + maxDurationMs);
  }
}

/** SPEC §4: send the last reply and a FIN, read and discard for LINGER_MS, then destroy. */
function linger(conversation: Conversation, reason: EndReason): void {
  if (conversation.end) return;
  conversation.end = reason;
  conversation.lingering = true;
  conversation.conduit.end();
  // A reader paused for a peer that did not read resumes, to discard its late
  // bytes so no reset destroys the reply in flight. Only then: resuming a
  // flowing socket cost Deno about 4 µs and Bun 2 per session.
  if (conversation.conduit.isPaused()) conversation.conduit.resume();
  conversation.at = Date.now() + LINGER_MS;
}

function stop(conversation: Conversation, reason: EndReason): void {
  conversation.end ??= reason;
  conversation.conduit.destroy();
}

function expire(conversation: Conversation): void {
  if (conversation.lingering) conversation.conduit.destroy();
  else stop(conversation, "timeout");
}

/** Where to listen: an address and port ("" = every address), or an inherited socket. */
export type ListenAddress = { readonly host: string; readonly port: number } | { readonly fd: number };

export interface ServeOptions {
  /** @default "greet" */
  readonly mode?: Mode;
  /** The name in replies (SPEC §3). @default the system's FQDN, else each connection's local address */
  readonly hostname?: string;
  /** @default [{ host: "", port: 25 }] (IPv6 and IPv4, or IPv4 alone without IPv6) */
  readonly listen?: readonly ListenAddress[];
  /** Lines per session. @default 20; 120 in `rcpt` mode (see MAX_COMMANDS) */
  readonly maxCommands?: number;
  /** Open session sockets, lingering ones included. @default 1000 */
  readonly maxConnections?: number;
  /** Open session sockets from one address. @default 10 */
  readonly maxPerIp?: number;
  /** Idle time-out from the last complete line, in ms. @default 300_000 */
  readonly timeoutMs?: number;
  /** A session's whole life, in ms, however busy it is. @default 600_000 */
  readonly maxDurationMs?: number;
  /** @default 521 */
  readonly rcptCode?: RcptCode;
  /** `rcpt` mode: the refused domains. @default null (every domain) */
  readonly domains?: DomainList | null;
  /** @default no logging */
  readonly log?: Log;
}

export interface Smtp521Server {
  /** The bound addresses, with their actual ports. */
  readonly addresses: readonly AddressInfo[];
  /** Where the name in replies came from: `--hostname`, `system`, or `local-address`. */
  readonly name: { readonly value: string; readonly source: string };
  /** Open session sockets, lingering ones included. */
  connections(): number;
  /** Stop accepting, let sessions end for up to `drainMs`, close the rest; sessions by end reason. */
  close(drainMs?: number): Promise<Record<string, number>>;
}

/**
 * Lines per session by mode. A relay must take 100 recipients in one
 * transaction (RFC 5321 §4.5.3.1.8), so `rcpt` mode allows EHLO, MAIL, 100
 * RCPT, DATA, QUIT and room to spare: every recipient is refused in one session.
 */
export const MAX_COMMANDS: Readonly<Record<Mode, number>> = Object.freeze({ greet: 20, close: 20, rcpt: 120 });

const DEFAULTS = {
  mode: "greet",
  listen: [{ host: "", port: 25 }],
  maxConnections: 1000,
  maxPerIp: 10,
  timeoutMs: 300_000,
  maxDurationMs: 600_000,
  rcptCode: 521,
  domains: null,
  log: () => {},
} as const;

// Deno's permission API, where present (SPEC §5: never prompt, fall back quietly).
interface DenoGlobal {
  permissions: { querySync(descriptor: PermissionQuery): { state: string } };
  version: { deno: string };
  listen(options: { hostname: string; port: number; transport: "tcp" }): DenoListener;
}
interface DenoAddr {
  readonly hostname: string;
  readonly port: number;
}
interface DenoListener {
  readonly addr: DenoAddr;
  accept(): Promise<DenoConn>;
  close(): void;
}
interface DenoConn {
  readonly remoteAddr: DenoAddr;
  readonly localAddr: DenoAddr;
  read(buffer: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  closeWrite(): Promise<void>;
  close(): void;
}
const deno = (globalThis as unknown as { Deno?: DenoGlobal }).Deno;
const bun = (globalThis as unknown as { Bun?: { version: string } }).Bun;
export const RUNTIME = deno
  ? `deno/${deno.version.deno}`
  : bun
  ? `bun/${bun.version}`
  : `node/${process.versions.node}`;

type PermissionQuery = { name: string; kind?: string; variable?: string; path?: string };

function mayRead(descriptor: PermissionQuery): boolean {
  return !deno || deno.permissions.querySync(descriptor).state === "granted";
}

function readEnv(variable: string): string | undefined {
  return mayRead({ name: "env", variable }) ? process.env[variable] : undefined;
}

/** The system host name, checked, if it may be read without a prompt. */
function systemName(): string | null {
  return mayRead({ name: "sys", kind: "hostname" }) ? checkedDomain(systemHostname()) : null;
}

/** SPEC §3: the flag, else a fully qualified system name; null: each connection's local address. */
function fixedName(hostname: string | undefined): { value: string; source: string } | null {
  if (hostname) return { value: hostname, source: "--hostname" };
  const system = systemName();
  return system?.includes(".") ? { value: system, source: "system" } : null;
}

/** `1.2.3.4:25`, `[2001:db8::1]:25`: only IPv6 has a colon, and testing for one is cheap per session. */
export function hostPort(ip: string, port: number | string): string {
  return ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/** SPEC §6: the one line per finished session, over TCP and over stdio alike. */
function sessionLine(
  log: Log,
  mode: Mode,
  remote: string,
  localPort: number | string,
  started: number,
  lines: number,
  end: EndReason,
  at = Date.now(),
): void {
  log("session", { remote, local_port: localPort, mode, duration_ms: at - started, lines, end }, at);
}

/** How long a finished TCP session waits for its line (SPEC §6): off the reply path, and written with others. */
const LOG_BATCH_MS = 50;

/** What a TCP session's line needs once it is over. */
type Ended = Pick<Conversation, "ip" | "port" | "started" | "lines">;

/**
 * The session lines of a TCP server, LOG_BATCH_MS at a time. A finished
 * session waits here as the numbers and the address it already had, and its
 * line is built with the rest of its batch and handed on at once. Built when
 * its session ended and held until the write, a line cost about 2 µs more per
 * session on Node and Bun (bench/HISTORY.md, item 10).
 */
function sessionBatch(log: Log, mode: Mode) {
  const ips: string[] = [];
  const ends: EndReason[] = [];
  /** Five per session: remote port, local port, start, lines, end (times in ms since the epoch). */
  const numbers: number[] = [];
  let timer: ReturnType<typeof setTimeout> | undefined;
  // An index loop, no array or object per line: slicing out each session's numbers cost Node about 2 µs per session.
  const flush = () => {
    timer = void clearTimeout(timer);
    for (let i = 0, n = 0; i < ips.length; i++, n += 5) {
      const remote = ips[i] ? hostPort(ips[i], numbers[n]) : "-";
      sessionLine(log, mode, remote, numbers[n + 1], numbers[n + 2], numbers[n + 3], ends[i], numbers[n + 4]);
    }
    ips.length = ends.length = numbers.length = 0;
  };
  const add = (end: EndReason, { ip, port, started, lines }: Ended, localPort: number) => {
    timer ??= setTimeout(flush, LOG_BATCH_MS);
    ips.push(ip);
    ends.push(end);
    numbers.push(port, localPort, started, lines, Date.now());
  };
  return { add, flush };
}

/** A connection: its byte stream, and its two ends where the runtime knows them. */
type Connection = Conduit & {
  readonly remoteAddress?: string;
  readonly remotePort?: number;
  readonly localAddress?: string;
};

/** A bound listener, over node:net or Deno's own API. */
interface Listener {
  readonly address: AddressInfo;
  /** Hand each accepted connection to `accepted`; trouble accepting goes to `failed`. */
  start(accepted: (connection: Connection) => void, failed: (error: NodeJS.ErrnoException) => void): void;
  close(): void;
}

function bindNode(where: ListenAddress): Promise<Listener> {
  const server: Server = createServer();
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    const ready = () => {
      server.off("error", reject);
      resolve({
        address: server.address() as AddressInfo,
        start(accepted, failed) {
          server.on("connection", accepted);
          server.on("error", failed);
        },
        close: () => server.close(),
      });
    };
    if ("fd" in where) server.listen({ fd: where.fd }, ready);
    else server.listen({ host: where.host, port: where.port }, ready);
  });
}

/** After a failed accept (out of descriptors), wait this long before the next. */
const ACCEPT_RETRY_MS = 100;

/**
 * Deno's own listener. Deno's node:net listener stops accepting for good after
 * one EMFILE, and loses the greeting of a client that half-closes at once;
 * `Deno.listen` reports EMFILE and goes on once descriptors free up.
 */
function bindDeno(where: { host: string; port: number }): Listener {
  const listener = deno!.listen({ hostname: where.host, port: where.port, transport: "tcp" });
  const { hostname, port } = listener.addr;
  let open = true;
  return {
    address: { address: hostname, family: hostname.includes(":") ? "IPv6" : "IPv4", port },
    async start(accepted, failed) {
      while (open) {
        let conn: DenoConn;
        try {
          conn = await listener.accept();
        } catch (error) {
          if (open) failed(error as NodeJS.ErrnoException);
          await sleep(ACCEPT_RETRY_MS);
          continue;
        }
        accepted(denoConnection(conn));
      }
    },
    close() {
      open = false;
      listener.close();
    },
  };
}

/** Deno: read at most this much at once (a line is at most MAX_LINE octets). */
const DENO_READ_BYTES = 1024;
/** Deno: past this many bytes not yet written, `write` says "wait for drain", as node:net does. */
const DENO_HIGH_WATER = 64 * 1024;

/** A Deno connection as a Conduit: node:net's events over Deno's promises. */
function denoConnection(conn: DenoConn): Connection {
  const events = new EventEmitter();
  let writes = Promise.resolve();
  let queued = 0;
  let paused = false;
  let wake: (() => void) | null = null;
  let gone = false;
  let finished = false; // our side is ended
  let eof = false; // the client's side is ended
  const destroy = () => {
    if (gone) return;
    gone = true;
    try {
      conn.close();
    } catch { /* already closed by the runtime */ }
    wake?.();
    events.emit("close");
  };
  const failed = () => {
    if (!gone) events.emit("error");
    destroy();
  };
  // Both sides ended and everything written: nothing is left to linger for.
  const closeIfDone = () => finished && eof && writes.then(destroy);
  const write = (text: string) => {
    const bytes = Buffer.from(text, "latin1");
    queued += bytes.length;
    writes = writes.then(() => writeAll(conn, bytes)).then(() => {
      queued -= bytes.length;
      if (queued === 0) events.emit("drain");
    }, failed);
    return queued < DENO_HIGH_WATER;
  };
  const connection = Object.assign(events, {
    remoteAddress: conn.remoteAddr.hostname,
    remotePort: conn.remoteAddr.port,
    localAddress: conn.localAddr.hostname,
    write,
    end(last?: string, done?: () => void) {
      if (last) write(last);
      finished = true;
      writes = writes.then(() => conn.closeWrite()).then(done, failed);
      closeIfDone();
    },
    destroy,
    pause: () => void (paused = true),
    resume() {
      paused = false;
      wake?.();
    },
    isPaused: () => paused,
  });
  (async () => {
    const buffer = new Uint8Array(DENO_READ_BYTES);
    while (!gone) {
      if (paused) {
        await new Promise<void>((resolve) => wake = resolve);
        wake = null;
        continue;
      }
      let n: number | null;
      try {
        n = await conn.read(buffer);
      } catch {
        return failed();
      }
      if (gone) return;
      if (n === null) {
        eof = true;
        events.emit("end");
        return closeIfDone();
      }
      events.emit("data", buffer.subarray(0, n));
    }
  })();
  return connection as unknown as Connection;
}

async function writeAll(conn: DenoConn, bytes: Uint8Array): Promise<void> {
  for (let sent = 0; sent < bytes.length;) sent += await conn.write(bytes.subarray(sent));
}

function bind(where: ListenAddress): Promise<Listener> {
  if (!deno || "fd" in where) return bindNode(where);
  return new Promise((resolve) => resolve(bindDeno(where))); // a failure to bind rejects
}

/** SPEC §5: "every address" is `::` (IPv4 too), or `0.0.0.0` where IPv6 is absent. */
async function bindAll(where: ListenAddress): Promise<Listener> {
  if ("fd" in where || where.host) return await bind(where);
  try {
    return await bind({ host: "::", port: where.port });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== "EAFNOSUPPORT" && code !== "EADDRNOTAVAIL") throw error;
    return await bind({ host: "0.0.0.0", port: where.port });
  }
}

/** Serve smtp521 on TCP until `close()`. Rejects if any address cannot be bound. */
export async function serve(options: ServeOptions = {}): Promise<Smtp521Server> {
  const o = { ...DEFAULTS, ...options };
  const name = fixedName(o.hostname);
  const { mode, rcptCode, domains } = o;
  const maxCommands = o.maxCommands ?? MAX_COMMANDS[mode];
  // One config per name: a fixed one, or one per local address.
  const configFor = boundedCache((name): SessionConfig => ({ mode, name, maxCommands, rcptCode, domains }));
  const perNetwork = new Map<string, number>();
  const sweeper = deadlineSweeper(Math.min(o.timeoutMs, o.maxDurationMs));
  const lines = sessionBatch(o.log, o.mode);
  const ended: Record<string, number> = {};
  let open = 0;
  let overloaded = 0;
  let lastWarning = 0;
  const room = descriptorRoom();

  function logSession(end: EndReason, c: Ended, localPort: number) {
    ended[end] = (ended[end] ?? 0) + 1;
    lines.add(end, c, localPort);
  }

  function closed(c: Conversation, end: EndReason, localPort: number) {
    if (c.over) overloaded--;
    else {
      open--;
      const network = clientNetwork(c.ip);
      const left = perNetwork.get(network)! - 1;
      if (left) perNetwork.set(network, left);
      else perNetwork.delete(network);
    }
    logSession(end, c, localPort);
  }

  /** A connection on a listener bound to `localIp` (the name if none is fixed) and `localPort`. */
  function accept(connection: Connection, owner: Owner, localIp: string | undefined, localPort: number) {
    const remoteAddress = connection.remoteAddress;
    const ip = remoteAddress ? plainAddress(remoteAddress) : "";
    const local = name?.value ?? localIp ?? connection.localAddress;
    if (!ip || !local) { // reset while it waited to be accepted
      connection.destroy();
      return logSession("reset", { ip, port: 0, started: Date.now(), lines: 0 }, localPort);
    }
    const config = configFor(name ? name.value : addressLiteral(local));
    const port = connection.remotePort ?? 0;
    const network = clientNetwork(ip);
    const fromNetwork = perNetwork.get(network) ?? 0;
    const over = open >= o.maxConnections || fromNetwork >= o.maxPerIp;
    if (open + overloaded >= room) warn("EMFILE", `near the descriptor limit: ${open + overloaded} sockets open`);
    if ((over && overloaded >= o.maxConnections) || open + overloaded >= room) {
      // SPEC §4: even the lingering of refusals is bounded; past it, greet and drop.
      connection.on("error", () => {});
      connection.end(repliesFor(config.name).refuse, () => connection.destroy());
      return logSession("overload", { ip, port, started: Date.now(), lines: 0 }, localPort);
    }
    if (over) overloaded++;
    else {
      open++;
      perNetwork.set(network, fromNetwork + 1);
    }
    converse(connection, over ? overloadSession(config) : createSession(config), owner, { ip, port, over });
  }

  /** SPEC §4: trouble accepting (out of descriptors) is logged at most once a second. */
  function warn(error: string, detail: string) {
    const now = Date.now();
    if (now - lastWarning < 1000) return;
    lastWarning = now;
    o.log("error", { error, detail });
  }
  const acceptFailed = (error: NodeJS.ErrnoException) => warn(error.code ?? "accept", error.message);

  const listeners: Listener[] = [];
  const addresses: AddressInfo[] = [];
  try {
    for (const where of o.listen) {
      const listener = await bindAll(where);
      listeners.push(listener);
      const address = listener.address;
      addresses.push(address);
      // The listener's own address and port stand for the socket's, saving a getsockname per connection.
      const { port } = address;
      const owner: Owner = {
        idleMs: o.timeoutMs,
        maxDurationMs: o.maxDurationMs,
        sweeper,
        closed: (c, end) => closed(c, end, port),
      };
      const localIp = isUnspecified(address.address) ? undefined : address.address;
      listener.start((connection) => accept(connection, owner, localIp, port), acceptFailed);
    }
  } catch (error) {
    for (const listener of listeners) listener.close();
    throw Object.assign(error as Error, { listen: describeListen(o.listen[listeners.length]) });
  }

  async function close(drainMs = 5000): Promise<Record<string, number>> {
    for (const listener of listeners) listener.close();
    const deadline = Date.now() + drainMs;
    while (open + overloaded > 0 && Date.now() < deadline) await sleep(50);
    sweeper.stopAll("shutdown");
    while (open + overloaded > 0) await sleep(10);
    lines.flush();
    return ended;
  }

  const nameInfo = name ?? { value: "[local address of each connection]", source: "local-address" };
  return { addresses, name: nameInfo, connections: () => open + overloaded, close };
}

/** A wildcard bind: each connection's local address must be asked of its socket. */
function isUnspecified(ip: string): boolean {
  return ip === "::" || ip === "0.0.0.0" || ip === "";
}

/** Descriptors the runtime itself holds (event loop, stdio, workers), measured at about 25. */
const RESERVED_DESCRIPTORS = 32;

/**
 * How many sockets fit under the descriptor limit (Linux, where it may be
 * read). Staying under it keeps the accept loop off EMFILE, which Node
 * absorbs silently and which stops Deno's node:net listener for good.
 */
function descriptorRoom(): number {
  if (!mayRead({ name: "read", path: "/proc/self/limits" })) return Infinity;
  try {
    const limit = /^Max open files\s+(\d+)/m.exec(readFileSync("/proc/self/limits", "latin1"))?.[1];
    return limit ? Number(limit) - RESERVED_DESCRIPTORS : Infinity;
  } catch {
    return Infinity;
  }
}

function describeListen(where: ListenAddress): string {
  return "fd" in where ? `fd:${where.fd}` : hostPort(where.host || "::", where.port);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export type StdioOptions = Pick<
  ServeOptions,
  "mode" | "hostname" | "maxCommands" | "timeoutMs" | "maxDurationMs" | "rcptCode" | "domains" | "log"
>;

/**
 * SPEC §5 `--stdio`: one session on standard input and output, as inetd,
 * xinetd, systemd `Accept=yes`, tcpserver and socat run it. Resolves with the
 * end reason once the session is over and its replies are flushed.
 */
export function serveStdio(options: StdioOptions = {}): { done: Promise<EndReason>; stop(reason: EndReason): void } {
  const o = { ...DEFAULTS, ...options };
  const conduit = stdioConduit();
  // The socket's own addresses where it has them; else tcpserver's and systemd's variables.
  const { remoteAddress, remotePort: port, localAddress, localPort: local } = conduit;
  const remoteIp = remoteAddress ?? readEnv("TCPREMOTEIP") ?? readEnv("REMOTE_ADDR") ?? readEnv("REMOTE_HOST");
  const remotePort = port ?? readEnv("TCPREMOTEPORT") ?? readEnv("REMOTE_PORT") ?? "-";
  const localPort = local ?? readEnv("TCPLOCALPORT") ?? "-";
  const name = stdioName(o.hostname, localAddress, o.log);
  const session = createSession({ ...o, maxCommands: o.maxCommands ?? MAX_COMMANDS[o.mode], name });
  const sweeper = deadlineSweeper(Math.min(o.timeoutMs, o.maxDurationMs));
  const done = new Promise<EndReason>((resolve) => {
    const closed = (c: Conversation, end: EndReason) => {
      const remote = remoteIp ? hostPort(plainAddress(remoteIp), remotePort) : "-";
      sessionLine(o.log, o.mode, remote, localPort, c.started, c.lines, end);
      resolve(end);
    };
    converse(conduit, session, { idleMs: o.timeoutMs, maxDurationMs: o.maxDurationMs, sweeper, closed });
  });
  return { done, stop: sweeper.stopAll };
}

/**
 * Stdin and stdout as one conduit. Where they are one socket (inetd, systemd
 * `Accept=yes`, socat), its addresses name the ends, and on Node the session
 * runs over that socket, for a real half-close. Bun cannot open descriptor 0
 * as a socket, and Deno's node:net socket loses the greeting of a client that
 * half-closes at once: there the session runs over stdin and stdout joined.
 */
function stdioConduit(): Connection & { readonly localPort?: number } {
  const [input, output] = [fstatSync(0), fstatSync(1)];
  const oneSocket = input.isSocket() && input.dev === output.dev && input.ino === output.ino;
  if (oneSocket && !bun && !deno) return new Socket({ fd: 0, readable: true, writable: true });
  const joined = Duplex.from({ readable: process.stdin, writable: process.stdout });
  if (!oneSocket || bun) return joined;
  const ends = new Socket({ fd: 0, readable: false, writable: false }); // only asked for its addresses
  const { localAddress, localPort, remoteAddress, remotePort } = ends;
  return Object.assign(joined, { localAddress, localPort, remoteAddress, remotePort });
}

/** SPEC §5: the name for a stdio session, from the best source the runtime allows. */
function stdioName(hostname: string | undefined, localAddress: string | undefined, log: Log): string {
  const fixed = fixedName(hostname);
  if (fixed) return fixed.value;
  const local = localAddress ?? readEnv("TCPLOCALIP");
  if (local && isIP(plainAddress(local))) return addressLiteral(local);
  const named = checkedDomain(readEnv("TCPLOCALHOST") ?? "") ?? systemName();
  if (named) return named;
  log("warning", { detail: "no name for replies: using localhost; pass --hostname" });
  return "localhost";
}

// ---------------------------------------------------------------------------
// Options (SPEC §6): every flag, its default, and one line naming the fix.
// ---------------------------------------------------------------------------

export const USAGE = `smtp521 ${VERSION}: refuse all mail with a permanent 521 (RFC 1846, RFC 7504)

usage: smtp521.ts [flags]
       (to check a host or a domain from a workstation: probe.ts, beside this file)

  --mode greet|close|rcpt   greet: 521 greeting, 521 to every line, 221 to QUIT
                            close: 521 greeting, then close
                            rcpt:  220 greeting, 521 to every RCPT (default greet)
  --hostname NAME           name in replies (default: the system's FQDN, else
                            the local address of each connection)
  --listen ADDR:PORT        where to listen, repeatable: 192.0.2.1:25, [::1]:25,
                            :25 for every address, fd:3 for systemd sockets
                            (default :25, that is [::]:25, IPv4 included)
  --port N                  short for --listen :N
  --stdio                   one session on stdin/stdout (inetd, Accept=yes)
  --domains LIST            rcpt mode: refuse only these domains, comma-separated;
                            .example.org refuses every name under it; other
                            recipients get 550 (default: refuse every domain)
  --rcpt-code 521|556       rcpt mode: reply code for a refused recipient (default 521)
  --max-commands N          lines per session, 1-1000 (default 20; 120 in rcpt mode)
  --max-connections N       open sessions in all (default 1000)
  --max-per-ip N            open sessions from one address (default 10)
  --timeout S               idle time-out in seconds (default 300)
  --max-duration S          a session's whole life in seconds (default 600)
  --drain S                 on SIGTERM, time open sessions get to end (default 5)
  --user NAME[:GROUP]       drop privileges after binding, Node and Bun; names or
                            numeric ids (default: none)
  --log text|json|off       one line per session on stderr (default text)
  -h, --help                this text
  --version                 the version
`;

const FLAGS = {
  mode: { type: "string", default: "greet" },
  hostname: { type: "string" },
  listen: { type: "string", multiple: true },
  port: { type: "string" },
  stdio: { type: "boolean", default: false },
  domains: { type: "string" },
  "rcpt-code": { type: "string", default: "521" },
  "max-commands": { type: "string" },
  "max-connections": { type: "string", default: "1000" },
  "max-per-ip": { type: "string", default: "10" },
  timeout: { type: "string", default: "300" },
  "max-duration": { type: "string", default: "600" },
  drain: { type: "string", default: "5" },
  user: { type: "string" },
  log: { type: "string", default: "text" },
  help: { type: "boolean", short: "h", default: false },
  version: { type: "boolean", default: false },
} as const;

export type LogFormat = "text" | "json" | "off";

export interface Options extends Required<Omit<ServeOptions, "hostname" | "log">> {
  readonly hostname: string | undefined;
  readonly stdio: boolean;
  readonly drainMs: number;
  readonly user: string | undefined;
  readonly logFormat: LogFormat;
  readonly help: boolean;
  readonly version: boolean;
}

/** A configuration error: names the flag and the fix (SPEC §6, exit 2). */
export interface UsageError {
  readonly error: string;
}

function choice<T extends string>(flag: string, value: string, allowed: readonly T[]): T | UsageError {
  return (allowed as readonly string[]).includes(value)
    ? value as T
    : { error: `--${flag}: "${value}" is not one of ${allowed.join(", ")}` };
}

function count(flag: string, value: string, min: number, max: number): number | UsageError {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  return n >= min && n <= max ? n : { error: `--${flag}: "${value}" must be a whole number from ${min} to ${max}` };
}

function seconds(flag: string, value: string): number | UsageError {
  const s = /^\d+(\.\d+)?$/.test(value) ? Number(value) : NaN;
  return s >= 0.1 && s <= 86_400
    ? Math.round(s * 1000)
    : { error: `--${flag}: "${value}" must be seconds from 0.1 to 86400` };
}

/** `ADDR:PORT`, `[IPv6]:PORT`, `:PORT` or `fd:N`. */
function listenAddress(value: string): ListenAddress | UsageError {
  const fd = /^fd:(\d+)$/.exec(value);
  if (fd) return { fd: Number(fd[1]) };
  const parts = /^(?:\[([0-9a-fA-F:.]+)\]|(\d+\.\d+\.\d+\.\d+))?:(\d+)$/.exec(value);
  const host = parts?.[1] ?? parts?.[2] ?? "";
  const port = Number(parts?.[3]);
  if (!parts || (host && !isIP(host)) || port > 65535) {
    return { error: `--listen: "${value}" is not ADDR:PORT, [IPv6]:PORT, :PORT or fd:N (e.g. 192.0.2.1:25)` };
  }
  return { host, port };
}

const isError = (value: unknown): value is UsageError =>
  typeof value === "object" && value !== null && "error" in value;

/** Parse the server's flags (not the probe's). */
export function parseOptions(args: readonly string[]): Options | UsageError {
  let values;
  try {
    ({ values } = parseArgs({ args: [...args], options: FLAGS, strict: true, allowPositionals: false }));
  } catch (error) {
    const flag = /'([^' ]+)/.exec((error as Error).message)?.[1] ?? String(args[0]);
    return { error: `${flag}: ${unknownOrBad(error)}; see --help` };
  }
  const mode = choice("mode", values.mode, ["greet", "close", "rcpt"] as const);
  const logFormat = choice("log", values.log, ["text", "json", "off"] as const);
  const rcptCode = choice("rcpt-code", values["rcpt-code"], ["521", "556"] as const);
  const maxCommands = values["max-commands"] === undefined
    ? MAX_COMMANDS[mode as Mode] ?? 20
    : count("max-commands", values["max-commands"], 1, 1000);
  const maxConnections = count("max-connections", values["max-connections"], 1, 1_000_000);
  const maxPerIp = count("max-per-ip", values["max-per-ip"], 1, 1_000_000);
  const timeoutMs = seconds("timeout", values.timeout);
  const maxDurationMs = seconds("max-duration", values["max-duration"]);
  const drainMs = seconds("drain", values.drain);
  const listen = values.port !== undefined
    ? [listenAddress(`:${values.port}`)]
    : (values.listen ?? [":25"]).map(listenAddress);
  const domains = values.domains === undefined ? null : parseDomainList(values.domains);
  const hostname = values.hostname;
  const problems = [
    mode,
    logFormat,
    rcptCode,
    maxCommands,
    maxConnections,
    maxPerIp,
    timeoutMs,
    maxDurationMs,
    drainMs,
    ...listen,
  ];
  const problem = problems.find(isError);
  if (problem) return problem;
  if (values.port !== undefined && values.listen) return { error: "--port: give either --port or --listen, not both" };
  if (hostname !== undefined && !checkedDomain(hostname)) {
    return {
      error: `--hostname: "${hostname}" is not a domain name or address literal (e.g. ntp1.example.org or [192.0.2.1])`,
    };
  }
  if (typeof domains === "string") {
    return {
      error: `--domains: "${domains}" is not a domain, .domain or address literal list (e.g. a.example,.b.example)`,
    };
  }
  if (domains && mode !== "rcpt") return { error: "--domains: only rcpt mode reads recipients; add --mode rcpt" };
  if (values.user !== undefined && !/^[^:]+(?::[^:]+)?$/.test(values.user)) {
    return { error: `--user: "${values.user}" is not NAME or NAME:GROUP (names or numeric ids, e.g. nobody)` };
  }
  if (values.stdio && (values.listen || values.port !== undefined)) {
    return { error: "--stdio: serves one session on stdin/stdout; drop --listen and --port" };
  }
  return {
    mode: mode as Mode,
    hostname: hostname === undefined ? undefined : checkedDomain(hostname)!,
    listen: listen as ListenAddress[],
    stdio: values.stdio,
    domains,
    rcptCode: Number(rcptCode) as RcptCode,
    maxCommands: maxCommands as number,
    maxConnections: maxConnections as number,
    maxPerIp: maxPerIp as number,
    timeoutMs: timeoutMs as number,
    maxDurationMs: maxDurationMs as number,
    drainMs: drainMs as number,
    user: values.user,
    logFormat: logFormat as LogFormat,
    help: values.help,
    version: values.version,
  };
}

function unknownOrBad(error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return "unknown flag";
  if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") return "unexpected argument";
  return "needs a value";
}

// ---------------------------------------------------------------------------
// Logs (SPEC §6): one line per event on stderr, never stdout (it may be the
// session, under --stdio). What one turn of the event loop logs goes out in
// one write: a write per session cost 10 % of a session's CPU.
// ---------------------------------------------------------------------------

/** A logfmt value that needs no quotes: printable ASCII without space, `"`, `=` or `\`. */
const BARE = /^[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+$/;

function logfmt(value: string | number): string {
  return typeof value === "number" || BARE.test(value) ? String(value) : JSON.stringify(value);
}

/** The time for log lines: the date and second formatted once a second, as a busy server logs thousands in one. */
let isoSecond = -1;
let isoPrefix = "";
function isoTime(now: number): string {
  const second = Math.floor(now / 1000);
  if (second !== isoSecond) {
    isoSecond = second;
    isoPrefix = new Date(second * 1000).toISOString().slice(0, 20); // "2026-11-30T03:01:20."
  }
  return `${isoPrefix}${String(now % 1000).padStart(3, "0")}Z`;
}

export function formatLine(
  format: "text" | "json",
  event: string,
  fields: Readonly<Record<string, string | number>>,
  at = Date.now(),
): string {
  const time = isoTime(at);
  if (format === "json") return JSON.stringify({ time, event, ...fields }) + "\n";
  let line = `time=${time} event=${event}`;
  for (const key in fields) line += ` ${key}=${logfmt(fields[key])}`;
  return line + "\n";
}

/** Log text waiting for a slow or stalled reader, at most; past it, lines are dropped. */
const LOG_BACKLOG = 1024 * 1024;
/** How long the last lines may take to leave at exit. */
const LOG_EXIT_MS = 2000;

/** Hands bytes to the log's sink, then calls back once, with the error if they were lost. */
export type LogSink = (bytes: Uint8Array, done: (error: Error | null) => void) => void;

/**
 * A log to standard error (or `sink`), one write at a time. The log is never
 * a way to stop the service: a sink that fails (EPIPE once the reader of a pipe
 * is gone, ENOSPC behind a redirect) or stalls costs dropped lines, counted,
 * never a crash or unbounded memory. The first write that gets through after
 * a loss says how many lines were lost; `dropped` counts them all, for the
 * stop line. `flush` waits for what it holds (call it before exit).
 */
export function createLog(
  format: LogFormat,
  sink: LogSink = writeStderr,
): { log: Log; flush(): Promise<void>; dropped(): number } {
  if (format === "off") return { log: () => {}, flush: () => Promise.resolve(), dropped: () => 0 };
  let backlog = "";
  let writing = false;
  let unreported = 0;
  let dropped = 0;
  const flushed: (() => void)[] = [];
  const lose = (lines: number) => {
    unreported += lines;
    dropped += lines;
  };
  const pump = () => {
    if (writing) return;
    if (!backlog) return flushed.splice(0).forEach((resolve) => resolve());
    const reported = unreported;
    const notice = reported ? formatLine(format, "log", { dropped: reported }) : "";
    const bytes = Buffer.from(notice + backlog);
    const lines = backlog.split("\n").length - 1;
    backlog = "";
    writing = true;
    sink(bytes, (error) => {
      writing = false;
      if (error) lose(lines);
      else unreported -= reported;
      pump();
    });
  };
  const log: Log = (event, fields, at) => {
    const line = formatLine(format, event, fields, at);
    if (backlog.length + line.length > LOG_BACKLOG) return lose(1);
    if (!backlog) queueMicrotask(pump); // one write for what one turn logs, such as a batch of session lines
    backlog += line;
  };
  const flush = () =>
    new Promise<void>((resolve) => {
      flushed.push(resolve);
      setTimeout(resolve, LOG_EXIT_MS).unref();
      pump();
    });
  return { log, flush, dropped: () => dropped };
}

/** Write all of `bytes` to standard error (a pipe may take part of them), then call back. */
function writeStderr(bytes: Uint8Array, done: (error: Error | null) => void): void {
  write(2, bytes, 0, bytes.length, null, (error, written) => {
    if (error || written === bytes.length) done(error);
    else writeStderr(bytes.subarray(written), done);
  });
}

// ---------------------------------------------------------------------------
// Main: a server, or one stdio session, until SIGTERM or SIGINT (SPEC §6).
// ---------------------------------------------------------------------------

/** The fix for a listen failure, by cause (SPEC §6). */
const LISTEN_FIXES: Record<string, string> = {
  EACCES:
    "ports below 1024 need root or CAP_NET_BIND_SERVICE (systemd AmbientCapabilities=, setcap), or use a port above 1023",
  EADDRINUSE: "another server (an MTA?) holds that port: stop it, or choose another --listen",
  EADDRNOTAVAIL: "no interface has that address: check --listen",
  EBADF: "no socket was passed on that descriptor: start from a systemd .socket unit, or use --listen ADDR:PORT",
  ENOTSOCK: "that descriptor is not a socket: start from a systemd .socket unit, or use --listen ADDR:PORT",
};

/**
 * `--user NAME[:GROUP]`, names or numeric ids: supplementary groups, gid, then
 * uid, after binding (Node, Bun). A user named by number may have no passwd
 * entry to take groups from: its only group is then the one given.
 */
function dropPrivileges(spec: string): Record<string, string | number> {
  const [user, group] = spec.split(":").map((id) => /^\d+$/.test(id) ? Number(id) : id);
  const gid = group ?? primaryGroup(user);
  if (gid === undefined) throw new Error(`"${user}" is not in /etc/passwd; give NAME:GROUP`);
  if (typeof user === "string") process.initgroups!(user, gid);
  else process.setgroups!([gid]);
  process.setgid!(gid);
  process.setuid!(user);
  return { uid: process.getuid!(), gid: process.getgid!(), groups: process.getgroups!().join(",") };
}

/** The primary group of a user, by name or uid, from /etc/passwd. */
function primaryGroup(user: string | number): number | undefined {
  const entry = readFileSync("/etc/passwd", "latin1").split("\n").map((line) => line.split(":"))
    .find((fields) => fields[typeof user === "string" ? 0 : 2] === String(user));
  return entry?.[3] ? Number(entry[3]) : undefined;
}

/** One line on stderr, then the exit code (the write callback: nothing is cut short). */
function say(text: string, code: number): Promise<number> {
  return new Promise((resolve) => process.stderr.write(`smtp521: ${text}\n`, () => resolve(code)));
}

/** The first SIGTERM or SIGINT resolves; each later one calls `again` (stop draining). */
function signalled(again: () => void): Promise<string> {
  return new Promise((resolve) => {
    let first = true;
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      process.on(signal, () => {
        if (first) resolve(signal);
        else again();
        first = false;
      });
    }
  });
}

export async function main(args: readonly string[]): Promise<number> {
  process.stderr.on("error", () => {}); // a closed standard error is never fatal (the log counts its losses)
  if (args[0] === "probe") {
    return await say("probe: the probe is its own file now: run probe.ts (e.g. deno run --allow-net probe.ts HOST)", 2);
  }
  const options = parseOptions(args);
  if (isError(options)) return await say(options.error, 2);
  if (options.help || options.version) {
    const text = options.help ? USAGE : `smtp521 ${VERSION}\n`;
    return await new Promise((resolve) => process.stdout.write(text, () => resolve(0)));
  }
  if (deno && options.listen.some((where) => "fd" in where)) {
    return await say(
      "--listen fd:N: Deno cannot accept on an inherited socket; use --stdio with systemd Accept=yes, or --listen ADDR:PORT",
      2,
    );
  }
  if (deno && options.user) {
    return await say(
      "--user: Deno has no setgroups, so it cannot drop privileges safely; use systemd User= or DynamicUser=, or run under Node or Bun",
      2,
    );
  }
  const { log, flush, dropped } = createLog(options.logFormat);
  const common = { ...options, log };
  process.on("SIGHUP", () => log("signal", { signal: "SIGHUP", action: "ignored" }));

  if (options.stdio) {
    const session = serveStdio(common);
    const stop = () => session.stop("shutdown");
    signalled(stop).then(stop);
    await session.done;
    await flush();
    return 0;
  }

  let server: Smtp521Server;
  try {
    server = await serve(common);
  } catch (error) {
    const { code, message, listen } = error as NodeJS.ErrnoException & { listen?: string };
    const fix = LISTEN_FIXES[code ?? ""] ?? "check --listen";
    const line = `cannot listen on ${listen}: ${code ?? message}; ${fix}`;
    if (options.logFormat !== "json") return await say(line, 1);
    log("error", { listen: listen ?? "-", error: code ?? message, fix });
    await flush();
    return 1;
  }
  let ids = {};
  if (options.user) {
    try {
      ids = dropPrivileges(options.user);
    } catch (error) {
      await server.close(0);
      return await say(`--user: ${(error as Error).message}`, 1);
    }
  }
  log("start", {
    version: VERSION,
    runtime: RUNTIME,
    mode: options.mode,
    name: server.name.value,
    name_source: server.name.source,
    listen: server.addresses.map((a) => hostPort(a.address, a.port)).join(","),
    ...ids,
    pid: process.pid,
  });
  const signal = await signalled(() => server.close(0));
  const ended = await server.close(options.drainMs);
  const total = Object.values(ended).reduce((sum, n) => sum + n, 0);
  log("stop", { signal, sessions: total, ...ended, ...(dropped() ? { log_dropped: dropped() } : {}) });
  await flush();
  return 0;
}

if (import.meta.main) main(process.argv.slice(2)).then((code) => process.exit(code));
