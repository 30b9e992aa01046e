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
import { connect, createServer, Socket } from "node:net";
import { fstatSync, readFileSync } from "node:fs";
import { hostname as systemHostname } from "node:os";
import process from "node:process";
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

/** Replies by server name: a handful of names (one, or one per local address). */
const replyCache = new Map<string, Replies>();

export function repliesFor(name: string): Replies {
  let replies = replyCache.get(name);
  if (!replies) {
    if (replyCache.size >= 64) replyCache.clear();
    replies = buildReplies(name);
    replyCache.set(name, replies);
  }
  return replies;
}

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
    const v6 = /^ipv6:(.*)$/i.exec(inner);
    return v6 && isIPv6(v6[1]) ? `[IPv6:${v6[1].toLowerCase()}]` : null;
  }
  const name = text.endsWith(".") ? text.slice(0, -1) : text;
  return DOMAIN.test(name) ? name.toLowerCase() : null;
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
const TLS_HANDSHAKE = 0x16;
/** A cross-protocol probe (SPEC §4): an HTTP request line is never SMTP. */
const HTTP_REQUEST = /^(?:(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH) |[A-Z]+ \S+ HTTP\/\d)/;
const QUIT = /^quit[ \t]*$/i;
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
    let line = bytes.toString("latin1", start, lf);
    if (partial) line = partial.toString("latin1") + line;
    if (line.endsWith("\r")) line = line.slice(0, -1);
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
const COMMAND = /^([A-Za-z]+)(?: (.*))?$/s;
/** RFC 5321 §4.1.2 paths as `<...>`, then optional ESMTP parameters. */
const MAIL_FROM = /^FROM: ?<([\x21-\x3b\x3d\x3f-\x7e]*)>(?: [\x20-\x7e]*)?$/i;
const RCPT_TO = /^TO: ?<([\x21-\x3b\x3d\x3f-\x7e]+)>(?: [\x20-\x7e]*)?$/i;

/**
 * RFC 1846 §3: a relay dialog in which every recipient is refused. The only
 * client text a reply may carry is a recipient domain that `checkedDomain`
 * accepted; anything else in its place is the server's own name.
 */
function rcptAnswer(session: Session, line: string): Answer {
  const { replies } = session;
  const reply = (text: string): Answer => [text, null];
  const command = COMMAND.exec(line.replace(/[ \t]+$/, ""));
  if (!command) return reply(replies.unknownCommand);
  const verb = command[1].toUpperCase();
  const args = command[2] ?? "";
  switch (verb) {
    case "HELO":
    case "EHLO":
      if (!args) return reply(replies.badSyntax);
      session.inTransaction = false; // RFC 5321 §4.1.4: a new EHLO resets the transaction
      return reply(replies.hello);
    case "MAIL":
      if (!MAIL_FROM.test(args)) return reply(replies.badSyntax);
      if (session.inTransaction) return reply(replies.badSequence);
      session.inTransaction = true;
      return reply(replies.ok);
    case "RCPT": {
      if (!session.inTransaction) return reply(replies.badSequence);
      const to = RCPT_TO.exec(args);
      return reply(to ? recipient(session, to[1]) : replies.badSyntax);
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

/** A byte stream both ways: a TCP socket, or stdin and stdout joined. */
interface Conduit {
  write(text: string): boolean;
  end(): void;
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
  /** When the sweeper acts: the idle deadline, then the end of the linger. */
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
    at: started + owner.idleMs,
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
  else if (step.lines) conversation.at = Date.now() + conversation.owner.idleMs;
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
  /** Lines per session. @default 20 */
  readonly maxCommands?: number;
  /** Open session sockets, lingering ones included. @default 1000 */
  readonly maxConnections?: number;
  /** Open session sockets from one address. @default 10 */
  readonly maxPerIp?: number;
  /** Idle time-out from the last complete line, in ms. @default 300_000 */
  readonly timeoutMs?: number;
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

const DEFAULTS = {
  mode: "greet",
  listen: [{ host: "", port: 25 }],
  maxCommands: 20,
  maxConnections: 1000,
  maxPerIp: 10,
  timeoutMs: 300_000,
  rcptCode: 521,
  domains: null,
  log: () => {},
} as const;

// Deno's permission API, where present (SPEC §5: never prompt, fall back quietly).
interface DenoGlobal {
  permissions: { querySync(descriptor: PermissionQuery): { state: string } };
  version: { deno: string };
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

function listenOn(server: Server, where: ListenAddress): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    const ready = () => {
      server.off("error", reject);
      resolve(server.address() as AddressInfo);
    };
    if ("fd" in where) server.listen({ fd: where.fd }, ready);
    else server.listen({ host: where.host, port: where.port }, ready);
  });
}

/** SPEC §5: "every address" is `::` (IPv4 too), or `0.0.0.0` where IPv6 is absent. */
async function listenAll(server: Server, where: ListenAddress): Promise<AddressInfo> {
  if ("fd" in where || where.host) return await listenOn(server, where);
  try {
    return await listenOn(server, { host: "::", port: where.port });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== "EAFNOSUPPORT" && code !== "EADDRNOTAVAIL") throw error;
    return await listenOn(server, { host: "0.0.0.0", port: where.port });
  }
}

/** Serve smtp521 on TCP until `close()`. Rejects if any address cannot be bound. */
export async function serve(options: ServeOptions = {}): Promise<Smtp521Server> {
  const o = { ...DEFAULTS, ...options };
  const name = fixedName(o.hostname);
  const configs = new Map<string, SessionConfig>(); // one per name: a fixed one, or one per local address
  const perIp = new Map<string, number>();
  const sweeper = deadlineSweeper(o.timeoutMs);
  const lines = sessionBatch(o.log, o.mode);
  const ended: Record<string, number> = {};
  let open = 0;
  let overloaded = 0;
  let lastWarning = 0;
  const room = descriptorRoom();

  function configFor(serverName: string): SessionConfig {
    let config = configs.get(serverName);
    if (!config) {
      const { mode, maxCommands, rcptCode, domains } = o;
      configs.set(serverName, config = { mode, name: serverName, maxCommands, rcptCode, domains });
    }
    return config;
  }

  function logSession(end: EndReason, c: Ended, localPort: number) {
    ended[end] = (ended[end] ?? 0) + 1;
    lines.add(end, c, localPort);
  }

  function closed(c: Conversation, end: EndReason, localPort: number) {
    if (c.over) overloaded--;
    else {
      open--;
      const left = perIp.get(c.ip)! - 1;
      if (left) perIp.set(c.ip, left);
      else perIp.delete(c.ip);
    }
    logSession(end, c, localPort);
  }

  /** A connection on a listener bound to `localIp` (the name if none is fixed) and `localPort`. */
  function accept(socket: Socket, owner: Owner, localIp: string | undefined, localPort: number) {
    const remoteAddress = socket.remoteAddress;
    const ip = remoteAddress ? plainAddress(remoteAddress) : "";
    const local = name?.value ?? localIp ?? socket.localAddress;
    if (!ip || !local) { // reset while it waited to be accepted
      socket.destroy();
      return logSession("reset", { ip, port: 0, started: Date.now(), lines: 0 }, localPort);
    }
    const config = configFor(name ? name.value : addressLiteral(local));
    const port = socket.remotePort ?? 0;
    const fromIp = perIp.get(ip) ?? 0;
    const over = open >= o.maxConnections || fromIp >= o.maxPerIp;
    if (open + overloaded >= room) warn("EMFILE", `near the descriptor limit: ${open + overloaded} sockets open`);
    if ((over && overloaded >= o.maxConnections) || open + overloaded >= room) {
      // SPEC §4: even the lingering of refusals is bounded; past it, greet and drop.
      socket.on("error", () => {});
      socket.end(repliesFor(config.name).refuse, () => socket.destroy());
      return logSession("overload", { ip, port, started: Date.now(), lines: 0 }, localPort);
    }
    if (over) overloaded++;
    else {
      open++;
      perIp.set(ip, fromIp + 1);
    }
    converse(socket, over ? overloadSession(config) : createSession(config), owner, { ip, port, over });
  }

  /** SPEC §4: trouble accepting (out of descriptors) is logged at most once a second. */
  function warn(error: string, detail: string) {
    const now = Date.now();
    if (now - lastWarning < 1000) return;
    lastWarning = now;
    o.log("error", { error, detail });
  }
  const acceptFailed = (error: NodeJS.ErrnoException) => warn(error.code ?? "accept", error.message);

  const servers: Server[] = [];
  const addresses: AddressInfo[] = [];
  try {
    for (const where of o.listen) {
      const server = createServer();
      servers.push(server);
      const address = await listenAll(server, where);
      addresses.push(address);
      // The listener's own address and port stand for the socket's, saving a getsockname per connection.
      const { port } = address;
      const owner: Owner = { idleMs: o.timeoutMs, sweeper, closed: (c, end) => closed(c, end, port) };
      const localIp = isUnspecified(address.address) ? undefined : address.address;
      server.on("connection", (socket: Socket) => accept(socket, owner, localIp, port));
      server.on("error", acceptFailed);
    }
  } catch (error) {
    for (const server of servers) server.close();
    throw Object.assign(error as Error, { listen: describeListen(o.listen[servers.length - 1]) });
  }

  async function close(drainMs = 5000): Promise<Record<string, number>> {
    for (const server of servers) server.close();
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
  "mode" | "hostname" | "maxCommands" | "timeoutMs" | "rcptCode" | "domains" | "log"
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
  const ends: Partial<Socket> = conduit instanceof Socket ? conduit : {};
  const remoteIp = ends.remoteAddress ?? readEnv("TCPREMOTEIP") ?? readEnv("REMOTE_ADDR") ?? readEnv("REMOTE_HOST");
  const remotePort = ends.remotePort ?? readEnv("TCPREMOTEPORT") ?? readEnv("REMOTE_PORT") ?? "-";
  const localPort = ends.localPort ?? readEnv("TCPLOCALPORT") ?? "-";
  const name = stdioName(o.hostname, ends.localAddress, o.log);
  const session = createSession({ ...o, name });
  const sweeper = deadlineSweeper(o.timeoutMs);
  const done = new Promise<EndReason>((resolve) => {
    const closed = (c: Conversation, end: EndReason) => {
      const remote = remoteIp ? hostPort(plainAddress(remoteIp), remotePort) : "-";
      sessionLine(o.log, o.mode, remote, localPort, c.started, c.lines, end);
      resolve(end);
    };
    converse(conduit, session, { idleMs: o.timeoutMs, sweeper, closed });
  });
  return { done, stop: sweeper.stopAll };
}

/**
 * Where stdin and stdout are one socket (inetd, systemd `Accept=yes`, socat),
 * that socket, for its addresses and a real half-close; else stdin and stdout
 * joined. Bun cannot open descriptor 0 as a socket, so it takes the join.
 */
function stdioConduit(): Socket | Duplex {
  const [input, output] = [fstatSync(0), fstatSync(1)];
  const oneSocket = input.isSocket() && input.dev === output.dev && input.ino === output.ino;
  if (oneSocket && !bun) return new Socket({ fd: 0, readable: true, writable: true });
  return Duplex.from({ readable: process.stdin, writable: process.stdout });
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
       smtp521.ts probe HOST[:PORT] [--rcpt USER@DOMAIN] [--timeout S] [--json]
                            check a host: exit 0 if it refuses mail the RFC 1846
                            way, 1 if not, 3 if unreachable (probe --timeout 10)

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
  --max-commands N          lines per session, 1-1000 (default 20)
  --max-connections N       open sessions in all (default 1000)
  --max-per-ip N            open sessions from one address (default 10)
  --timeout S               idle time-out in seconds (default 300)
  --drain S                 on SIGTERM, time open sessions get to end (default 5)
  --user NAME[:GROUP]       drop privileges after binding, Node and Bun (default: none)
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
  "max-commands": { type: "string", default: "20" },
  "max-connections": { type: "string", default: "1000" },
  "max-per-ip": { type: "string", default: "10" },
  timeout: { type: "string", default: "300" },
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
  const maxCommands = count("max-commands", values["max-commands"], 1, 1000);
  const maxConnections = count("max-connections", values["max-connections"], 1, 1_000_000);
  const maxPerIp = count("max-per-ip", values["max-per-ip"], 1, 1_000_000);
  const timeoutMs = seconds("timeout", values.timeout);
  const drainMs = seconds("drain", values.drain);
  const listen = values.port !== undefined
    ? [listenAddress(`:${values.port}`)]
    : (values.listen ?? [":25"]).map(listenAddress);
  const domains = values.domains === undefined ? null : parseDomainList(values.domains);
  const hostname = values.hostname;
  const problems = [mode, logFormat, rcptCode, maxCommands, maxConnections, maxPerIp, timeoutMs, drainMs, ...listen];
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

/** A log to stderr, and `flush` to wait for what it holds (call before exit). */
function stderrLog(format: LogFormat): { log: Log; flush(): Promise<void> } {
  let pending = "";
  const flush = () =>
    new Promise<void>((resolve) => {
      const text = pending;
      pending = "";
      if (text) process.stderr.write(text, () => resolve());
      else resolve();
    });
  if (format === "off") return { log: () => {}, flush };
  const log: Log = (event, fields, at) => {
    if (!pending) queueMicrotask(flush); // one write for what one turn logs, such as a batch of session lines
    pending += formatLine(format, event, fields, at);
  };
  return { log, flush };
}

// ---------------------------------------------------------------------------
// Probe (SPEC §7): play the sending client of RFC 1846 §5 against a host, say
// whether it refuses mail the RFC 1846 / RFC 7504 way and what senders will do.
// It never sends DATA, and ends with QUIT once a greeting came.
// ---------------------------------------------------------------------------

/** Probe exit codes (SPEC §7). */
export const PROBE_EXIT = Object.freeze({ refuses: 0, wrong: 1, usage: 2, unreachable: 3 });

const PROBE_FLAGS = {
  rcpt: { type: "string" },
  timeout: { type: "string", default: "10" },
  json: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} as const;

/** What sending MTAs did with each answer, measured (README, interop table). */
const SENDERS = Object.freeze({
  greeting: "Exim, Sendmail and Haraka bounce at once; Postfix with default settings (smtp_skip_5xx_greeting = yes) " +
    "and OpenSMTPD queue for days: consider --mode rcpt",
  rcpt: "Postfix, Exim, OpenSMTPD, Sendmail and Haraka all bounce at once",
  queue: "they queue the mail and retry for days (a temporary failure, RFC 5321 section 4.5.4.1)",
  deliver: "they deliver: this host accepts mail",
  bounce: "they bounce at once (a permanent failure), but are not told that this host takes no mail",
  unknown: "depends on the sender: RFC 1846 and RFC 7504 define no such answer",
});

/** A line sent or received, or an event (connected, closed, time-out); `ms` from the start. */
export type ProbeLine = { readonly ms: number; readonly dir: "sent" | "received" | "event"; readonly text: string };
/** What the probe found: the `--json` object. */
export interface ProbeReport {
  readonly target: string;
  readonly greeting: string | null;
  readonly mode: Mode | "none";
  readonly name: string | null;
  readonly quit: string | null;
  readonly verdict: string;
  readonly senders: string;
  readonly exit: number;
  readonly transcript: readonly ProbeLine[];
}
type Finding = Pick<ProbeReport, "mode" | "verdict" | "senders" | "exit">;
/** A reply (RFC 5321 §4.2: its code and first line), or why none came. */
type Reply = { readonly code: number; readonly line: string };
type Heard = Reply | keyof typeof FAILED;
const FAILED = Object.freeze({ timeout: "no reply within --timeout", closed: "a close", garbled: "not an SMTP reply" });

const wrong = (why: string, senders: string = SENDERS.unknown, mode: Finding["mode"] = "none"): Finding => ({
  mode,
  verdict: `does NOT refuse mail the RFC 1846 way: ${why}`,
  senders,
  exit: PROBE_EXIT.wrong,
});
const refuses = (mode: Mode, how: string, senders: string): Finding => ({
  mode,
  verdict: `refuses mail per RFC 1846/RFC 7504: ${how}`,
  senders,
  exit: PROBE_EXIT.refuses,
});
const has = (heard: Heard, ...codes: number[]) => typeof heard !== "string" && codes.includes(heard.code);
/** Server text made safe for a terminal. */
const printable = (text: string) => text.replace(/[^\x20-\x7e]/g, "?").slice(0, 200);
const quoted = (heard: Heard) => typeof heard === "string" ? FAILED[heard] : `"${printable(heard.line)}"`;

/** One client connection: each reply awaited at most `timeoutMs`; every line and event in `transcript`. */
function smtpClient(host: string, port: number, timeoutMs: number, transcript: ProbeLine[]) {
  const begun = Date.now();
  const note = (dir: ProbeLine["dir"], text: string) => transcript.push({ ms: Date.now() - begun, dir, text });
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

  /** RFC 5321 §4.2: `250-...` lines continue a reply; the line with a space (or the bare code) ends it. */
  function reply(): Heard | undefined {
    const last = lines.findIndex((line) => !/^\d{3}-/.test(line));
    if (last < 0) return flooded() ? "garbled" : ended ? "closed" : undefined;
    const taken = lines.splice(0, last + 1);
    const code = Number(taken[0].slice(0, 3));
    return taken.every((line) => /^\d{3}(?:[ -].*)?$/s.test(line)) ? { code, line: taken[0] } : "garbled";
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
      }, timeoutMs);
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
  if (noop === "closed") return refuses("close", "521 greeting, then close (RFC 1846 section 4.2 a)", SENDERS.greeting);
  if (!has(noop, 521)) return wrong(`NOOP after the 521 greeting got ${quoted(noop)}, not 521`, SENDERS.greeting);
  return refuses("greet", "521 greeting, 521 to a command, 221 to QUIT (RFC 1846 section 4.2 b)", SENDERS.greeting);
}

/** RFC 1846 §3: a relay greets 220 and refuses the recipient with 521 (or 556, RFC 7504 §3). */
async function atRecipient(client: SmtpClient, to: string, chosen: boolean): Promise<Finding> {
  let hello = await client.command(`EHLO ${client.literal()}`);
  if (typeof hello !== "string" && hello.code >= 500) { // RFC 5321 §3.2: a server may not know EHLO
    hello = await client.command(`HELO ${client.literal()}`);
  }
  if (!has(hello, 250)) return wrong(`EHLO/HELO got ${quoted(hello)}`);
  const mail = await client.command("MAIL FROM:<>"); // RFC 5321 §4.5.5: the null sender, as a bounce has
  if (!has(mail, 250)) return wrong(`MAIL FROM:<> got ${quoted(mail)}`);
  const rcpt = await client.command(`RCPT TO:<${to}>`);
  if (has(rcpt, 521, 556)) return refuses("rcpt", `220, then ${quoted(rcpt)} to RCPT TO:<${to}>`, SENDERS.rcpt);
  if (has(rcpt, 550) && !chosen) {
    return wrong(
      `RCPT TO:<${to}> got 550: not a domain this relay refuses for: pass --rcpt user@<a domain it refuses>`,
      SENDERS.bounce,
    );
  }
  if (typeof rcpt === "string") return wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}`);
  if (rcpt.code < 400) return wrong(`it accepted the recipient <${to}> (${quoted(rcpt)})`, SENDERS.deliver);
  return rcpt.code < 500
    ? wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}, a temporary failure`, SENDERS.queue)
    : wrong(`RCPT TO:<${to}> got ${quoted(rcpt)}, not 521 or 556`, SENDERS.bounce);
}

export interface ProbeOptions {
  readonly host: string;
  readonly port: number;
  readonly rcpt?: string;
  /** @default 10_000 */
  readonly timeoutMs?: number;
}

/** What the greeting (RFC 5321 §4.2, RFC 7504 §3) and the dialog after it say; QUIT is the caller's. */
async function judge(client: SmtpClient, greeting: Reply, name: string | null, rcpt?: string): Promise<Finding> {
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
  return to ? await atRecipient(client, to, rcpt !== undefined) : wrong("the greeting names no host: pass --rcpt");
}

/** Probe one host (SPEC §7); resolves with the report, never rejects. */
export async function probeHost(o: ProbeOptions): Promise<ProbeReport> {
  const transcript: ProbeLine[] = [];
  const client = smtpClient(o.host, o.port, o.timeoutMs ?? 10_000, transcript);
  const report = (found: Finding, greeting: string | null, name: string | null, quit: string | null): ProbeReport => {
    const { mode, verdict, senders, exit } = found;
    const target = hostPort(o.host, o.port);
    return { target, greeting, mode, name, quit, verdict, senders, exit, transcript: [...transcript] };
  };
  const cannot = (verdict: string) =>
    report({ mode: "none", verdict, senders: SENDERS.queue, exit: PROBE_EXIT.unreachable }, null, null, null);
  try {
    const greeting = await client.read(); // the connection and the greeting, within one time-out
    if (greeting === "closed" || greeting === "timeout") {
      const failure = client.failure();
      return cannot(failure ? `cannot be reached: ${failure}` : `no greeting: ${quoted(greeting)}`);
    }
    if (greeting === "garbled") return report(wrong(`the greeting is ${quoted(greeting)}`), null, null, null);
    // RFC 1846 §4.1, RFC 5321 §4.2 (Greeting): the first word after the code is a domain or address literal.
    const name = checkedDomain(greeting.line.slice(4).split(/[ \t]/)[0]);
    let found = await judge(client, greeting, name, o.rcpt);
    const open = client.open();
    const quit = await client.command("QUIT"); // RFC 5321 §4.1.1.10; not sent once the server has closed
    if (found.exit === PROBE_EXIT.refuses && open && !has(quit, 221)) {
      found = wrong(`QUIT got ${quoted(quit)}, not 221 (RFC 5321 section 4.1.1.10)`, found.senders, found.mode);
    }
    const quitText = !open ? null : typeof quit === "string" ? quoted(quit) : quit.line;
    return report(found, greeting.line, name, quitText);
  } finally {
    client.close();
  }
}

/** `host`, `host:port`, `[IPv6]:port`, `[IPv4]:port` or a bare IPv6 address; port 25 by default. */
function probeTarget(text: string): { host: string; port: number } | UsageError {
  const parts = isIPv6(text) ? [text, text] : /^\[([^\]]+)\](?::(\d{1,5}))?$|^([^:[\]]+)(?::(\d{1,5}))?$/.exec(text);
  const host = parts?.[1] ?? parts?.[3] ?? "";
  const port = Number(parts?.[2] ?? parts?.[4] ?? 25);
  const named = !!parts?.[3] && (isIPv4(host) || !!checkedDomain(host));
  if ((named || isIP(host)) && port >= 1 && port <= 65535) return { host, port };
  return { error: `probe: "${text}" is not HOST[:PORT] with a port from 1 to 65535 (e.g. mx.example, [::1]:2525)` };
}

/** `--rcpt`: an RFC 5321 §4.1.2 dot-string local part, then a domain or address literal. */
function probeRecipient(text: string): string | UsageError {
  const at = text.lastIndexOf("@");
  const domain = checkedDomain(text.slice(at + 1));
  return at > 0 && /^[\w!#$%&'*+/=?^`{|}~.-]{1,64}$/.test(text.slice(0, at)) && domain
    ? `${text.slice(0, at)}@${domain}`
    : { error: `--rcpt: "${text}" is not USER@DOMAIN (e.g. postmaster@nomail.example)` };
}

function parseProbe(args: readonly string[]): (ProbeOptions & { json: boolean }) | "help" | UsageError {
  let parsed;
  try {
    parsed = parseArgs({ args: [...args], options: PROBE_FLAGS, strict: true, allowPositionals: true });
  } catch (error) {
    const flag = /'([^' ]+)/.exec((error as Error).message)?.[1] ?? "probe";
    return { error: `${flag}: ${unknownOrBad(error)}; see --help` };
  }
  const { values, positionals } = parsed;
  if (values.help) return "help";
  if (positionals.length !== 1) return { error: "probe: give one HOST[:PORT] (e.g. probe mx.example:25)" };
  const target = probeTarget(positionals[0]);
  const timeoutMs = seconds("timeout", values.timeout);
  const rcpt = values.rcpt === undefined ? undefined : probeRecipient(values.rcpt);
  const problem = [target, timeoutMs, rcpt].find(isError);
  if (problem) return problem;
  const { host, port } = target as { host: string; port: number };
  return { host, port, rcpt: rcpt as string | undefined, timeoutMs: timeoutMs as number, json: values.json };
}

function probeText(r: ProbeReport): string {
  return [
    `probe:    ${r.target}`,
    `greeting: ${r.greeting === null ? "none" : printable(r.greeting)}`,
    `mode:     ${r.mode}`,
    `name:     ${r.name ?? "none"}`,
    `quit:     ${r.quit === null ? `not sent${r.greeting ? ": the server had closed" : ""}` : printable(r.quit)}`,
    `senders:  ${r.senders}`,
    `verdict:  ${r.verdict} (exit ${r.exit})`,
  ].join("\n") + "\n";
}

/** `smtp521.ts probe HOST[:PORT] [--rcpt USER@DOMAIN] [--timeout S] [--json]` (SPEC §7). */
export async function probe(args: readonly string[]): Promise<number> {
  const options = parseProbe(args);
  if (isError(options)) return await say(options.error, PROBE_EXIT.usage);
  const out = (text: string, code: number) =>
    new Promise<number>((resolve) => process.stdout.write(text, () => resolve(code)));
  if (options === "help") return await out(USAGE, 0);
  const report = await probeHost(options);
  return await out(options.json ? `${JSON.stringify(report)}\n` : probeText(report), report.exit);
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

/** `--user NAME[:GROUP]`: supplementary groups, gid, then uid, after binding (Node, Bun). */
function dropPrivileges(spec: string): Record<string, string | number> {
  const [user, group] = spec.split(":");
  const gid = group ?? primaryGroup(user);
  if (gid === undefined) throw new Error(`"${user}" is not in /etc/passwd; give NAME:GROUP`);
  process.initgroups!(user, gid);
  process.setgid!(gid);
  process.setuid!(user);
  return { uid: process.getuid!(), gid: process.getgid!(), groups: process.getgroups!().join(",") };
}

function primaryGroup(user: string): number | undefined {
  const entry = readFileSync("/etc/passwd", "latin1").split("\n").find((line) => line.startsWith(`${user}:`));
  const gid = entry?.split(":")[3];
  return gid ? Number(gid) : undefined;
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
  if (args[0] === "probe") return await probe(args.slice(1));
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
  const { log, flush } = stderrLog(options.logFormat);
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
  log("stop", { signal, sessions: total, ...ended });
  await flush();
  return 0;
}

if (import.meta.main) main(process.argv.slice(2)).then((code) => process.exit(code));
