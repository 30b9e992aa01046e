#!/usr/bin/env -S deno run --allow-net --no-prompt
/**
 * smtp521: an SMTP server for hosts that never receive mail.
 *
 * A host with nothing on port 25 makes senders queue misaddressed mail for days (a refused
 * connection is a temporary failure). smtp521 answers "521 <host> does not accept mail", a
 * permanent refusal, so the sender returns the message at once with a clear reason.
 *
 *   RFC 1846  SMTP 521 Reply Code (the modes: §3, §4.1, §4.2)
 *   RFC 7504  SMTP 521 and 556 Reply Codes (§3: 521 greeting, 556 at RCPT)
 *   RFC 5321  SMTP (line, path and time-out limits: §4.5.3)
 *   RFC 7505  Null MX (publish it too, where you control DNS)
 *
 * One file, no dependencies: Deno, Node >= 22.18 or Bun. README.md has the rest; probe.ts, beside
 * this file, checks a host from a workstation.
 *
 *   deno run --allow-net smtp521.ts [--mode greet|close|rcpt] [flags]
 *   node smtp521.ts --port 2525 --hostname ntp1.example
 *   bun smtp521.ts --stdio                      # from inetd / systemd Accept=yes
 *
 * As a library: `createSession` and `receive` are the protocol as a pure state machine (bytes in;
 * replies and "close now" out); `serve` runs it on TCP, `serveStdio` on standard input and output.
 * It never connects anywhere. The file reads in the order data flows: runtime, reply table, names,
 * session core, transports (limits, one conversation, listeners, stdio), options, logs, main. Each
 * part uses only what comes before it.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { fstatSync, readFileSync, write } from "node:fs";
import { createServer, isIP, isIPv4, isIPv6, Socket } from "node:net";
import type { AddressInfo } from "node:net";
import { hostname as systemHostname } from "node:os";
import process from "node:process";
import { Duplex } from "node:stream";
import { clearInterval, setInterval, setTimeout } from "node:timers";
import { parseArgs } from "node:util";

export const VERSION = "1.0.0";

// === Runtime ================================================================================
// Under Deno with only --allow-net, reading the host name, the environment or a file would
// prompt (freezing the event loop) or throw: the permission API, which never prompts, goes first.

type DenoAddr = { readonly hostname: string; readonly port: number };
interface DenoConn {
  readonly remoteAddr: DenoAddr;
  readonly localAddr: DenoAddr;
  read(buffer: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  closeWrite(): Promise<void>;
  close(): void;
}
type DenoListener = { readonly addr: DenoAddr; accept(): Promise<DenoConn>; close(): void };
type PermissionQuery = { name: string; kind?: string; variable?: string; path?: string };
const { Deno: deno, Bun: bun } = globalThis as unknown as {
  Deno?: {
    permissions: { querySync(query: PermissionQuery): { state: string } };
    version: { deno: string };
    listen(options: { hostname: string; port: number; transport: "tcp" }): DenoListener;
    stderr: { write(bytes: Uint8Array): Promise<number> };
  };
  Bun?: { version: string };
};
const runtimeVersion = deno ? `deno/${deno.version.deno}` : bun && `bun/${bun.version}`;
export const RUNTIME = runtimeVersion || `node/${process.versions.node}`;

function mayRead(query: PermissionQuery): boolean {
  return !deno || deno.permissions.querySync(query).state === "granted";
}

function readEnv(variable: string): string | undefined {
  return mayRead({ name: "env", variable }) ? process.env[variable] : undefined;
}

// === Reply table ============================================================================
// Every byte smtp521 sends is built here, from the server's name and, for RCPT only, a recipient
// domain that passed `checkedDomain`.

/** The fixed replies for one server name, CRLF-terminated. */
function buildReplies(name: string) {
  const replies = {
    refuse: `521 ${name} does not accept mail\r\n`, // RFC 1846 §4.1; greet mode's every answer
    closing: `221 ${name} closing connection\r\n`, // RFC 5321 §4.1.1.10: QUIT
    ready: `220 ${name} ESMTP refuses all mail\r\n`, // rcpt mode (RFC 1846 §3: a relay greets)
    hello: `250 ${name}\r\n`, // one line: no extension (PIPELINING, STARTTLS, AUTH) is offered
    ok: "250 OK\r\n",
    relayDenied: "550 relaying denied\r\n", // RFC 5321 §3.6.2: never an open relay
    noRecipients: "554 no valid recipients\r\n", // RFC 5321 §3.3; no reply is ever 354
    badSequence: "503 bad sequence of commands\r\n",
    badSyntax: "501 syntax error in parameters or arguments\r\n",
    notImplemented: "502 command not implemented\r\n",
    unknownCommand: "500 command not recognized\r\n",
    lineTooLong: "500 line too long\r\n", // RFC 5321 §4.5.3.1.6, in rcpt mode
  };
  return Object.freeze(replies);
}
export type Replies = ReturnType<typeof buildReplies>;
export type RcptCode = 521 | 556;

/** RFC 1846 §3, RFC 7504 §3: the RCPT refusal naming the recipient's domain. */
function rcptRefusal(code: RcptCode, domain: string): string {
  return `${code} ${domain} does not accept mail\r\n`;
}

const replyCache = new Map<string, Replies>();

/** The replies for a name, kept for 64 names: one per local address must not grow unbounded. */
export function repliesFor(name: string): Replies {
  let replies = replyCache.get(name);
  if (!replies) {
    if (replyCache.size >= 64) replyCache.clear();
    replyCache.set(name, replies = buildReplies(name));
  }
  return replies;
}

// === Names ==================================================================================
// A reply may only ever name a checked domain or address literal.

/** RFC 5321 §4.1.2 Domain: LDH labels of 1-63 octets (253 octets in all: checked apart). */
const LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
const DOMAIN = new RegExp(`^${LABEL}(?:\\.${LABEL})*$`, "i");

/**
 * A domain (lower-cased, one trailing dot dropped) or address literal (RFC 5321 §4.1.3: with no
 * zone id, which isIPv6 would take with any text after its `%`); else null.
 */
export function checkedDomain(text: string): string | null {
  if (text.startsWith("[") && text.endsWith("]")) {
    const inner = text.slice(1, -1);
    if (isIPv4(inner)) return text;
    const v6 = /^ipv6:([0-9a-f:.]{2,45})$/i.exec(inner);
    return v6 && isIPv6(v6[1]) ? `[IPv6:${v6[1].toLowerCase()}]` : null;
  }
  const name = text.endsWith(".") ? text.slice(0, -1) : text;
  return name.length <= 253 && DOMAIN.test(name) ? name.toLowerCase() : null;
}

/** The system host name, checked, if it may be read without a prompt. */
function systemName(): string | null {
  return mayRead({ name: "sys", kind: "hostname" }) ? checkedDomain(systemHostname()) : null;
}

/** `::ffff:192.0.2.1` -> `192.0.2.1`, `fe80::1%eth0` -> `fe80::1`. */
function plainAddress(ip: string): string {
  if (!ip.includes(":")) return ip;
  const unscoped = ip.replace(/%.*$/, "");
  return /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(unscoped)?.[1] ?? unscoped;
}

/** An IP address as RFC 5321 §4.1.3 writes it; IPv4-mapped IPv6 as IPv4. */
function addressLiteral(ip: string): string {
  const plain = plainAddress(ip);
  return isIPv6(plain) ? `[IPv6:${plain}]` : `[${plain}]`;
}

/** `192.0.2.1:25`, `[2001:db8::1]:25`. */
function hostPort(ip: string, port: number | string): string {
  return ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/** What `--max-per-ip` counts: an IPv4 address, or an IPv6 /64 (one host's, RFC 4291 §2.5.4). */
function clientNetwork(ip: string): string {
  if (!ip.includes(":")) return ip;
  const [head, tail] = ip.split("::");
  const groups = head ? head.split(":") : [];
  if (tail !== undefined && groups.length < 4) {
    const rest = tail ? tail.split(":") : [];
    const width = rest.length + (tail.includes(".") ? 1 : 0); // a dotted quad is two groups
    while (groups.length < Math.min(4, 8 - width)) groups.push("0");
    groups.push(...rest);
  }
  return groups.slice(0, 4).map((group) => parseInt(group, 16).toString(16)).join(":") + "::/64";
}

/** `--domains a.example,.b.example`: names, and with a leading dot every name under one. */
export type DomainList = Readonly<{ names: ReadonlySet<string>; parents: ReadonlySet<string> }>;

/** The list, or the first entry that is not a domain, `.domain` or address literal. */
export function parseDomainList(text: string): DomainList | string {
  const [names, parents] = [new Set<string>(), new Set<string>()];
  for (const entry of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const under = entry.startsWith(".");
    const domain = checkedDomain(under ? entry.slice(1) : entry);
    if (!domain || (under && domain.startsWith("["))) return entry;
    (under ? parents : names).add(domain);
  }
  return names.size + parents.size ? { names, parents } : text;
}

/** `.b.example` lists every name under b.example but not itself, as in Postfix tables. */
function listed(list: DomainList, domain: string): boolean {
  if (list.names.has(domain)) return true;
  for (let dot = domain.indexOf("."); dot >= 0; dot = domain.indexOf(".", dot + 1)) {
    if (list.parents.has(domain.slice(dot + 1))) return true;
  }
  return false;
}

// === Session core ===========================================================================
// The protocol as a pure state machine, with no sockets and no timers (after h11): the transport
// feeds it bytes; it answers with the text to send and, at the end, why.

export type Mode = "greet" | "close" | "rcpt";
type CoreEnd = "quit" | "closed" | "limit" | "overload" | "too-long" | "forbidden";
/** Why a session ended, as logged (README "Logs and signals"): in the core, or in a transport. */
export type EndReason = CoreEnd | "timeout" | "reset" | "client-closed" | "shutdown";

export interface SessionConfig {
  readonly mode: Mode;
  readonly name: string; // the name in replies, already checked
  readonly maxCommands: number; // lines a session may send: the last is answered, then the close
  readonly rcptCode: RcptCode; // rcpt mode: 521 (RFC 1846) or 556 (RFC 7504)
  readonly domains: DomainList | null; // rcpt mode: the domains refused; null: every domain
}

/** What the transport must do after feeding the core. */
export interface Step {
  readonly send: string; // replies to send, in order; "" for none
  readonly lines: number; // complete lines taken in (each restarts the idle time-out)
  readonly end: CoreEnd | null; // set once: send, then close (lingering) for this reason
}

/** One session's state: a plain object, changed only by `receive`. */
export interface Session {
  readonly config: SessionConfig;
  readonly replies: Replies;
  readonly greeting: Step; // the first step, taken as soon as the connection is accepted
  partial: Buffer | null; // the start of a line whose LF has not come yet: < MAX_LINE octets
  received: number; // complete lines so far
  over: boolean; // once set, every later byte is ignored
  inTransaction: boolean; // rcpt mode: a MAIL no RSET or HELO/EHLO has ended (RFC 5321 §4.1.4)
}

/** RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
export const MAX_LINE = 1000;
/** RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its punctuation. */
const MAX_PATH = 256;
const [TAB, LF, CR, SPACE, TLS_HANDSHAKE] = [0x09, 0x0a, 0x0d, 0x20, 0x16];
/** A cross-protocol probe: an HTTP request line is never SMTP. */
const HTTP_REQUEST =
  /^(?:(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH)(?: |$)|[A-Z]+ \S+ HTTP\/\d)/;
const QUIT = /^quit$/i;
const NOTHING: Step = Object.freeze({ send: "", lines: 0, end: null });

function newSession(config: SessionConfig, first: "ready" | "refuse", end: CoreEnd | null) {
  const replies = repliesFor(config.name);
  const greeting = { send: replies[first], lines: 0, end };
  const over = end !== null;
  return { config, replies, greeting, partial: null, received: 0, over, inTransaction: false };
}

export function createSession(config: SessionConfig): Session {
  if (config.mode === "rcpt") return newSession(config, "ready", null);
  return newSession(config, "refuse", config.mode === "close" ? "closed" : null);
}

/** A connection over a limit still hears the 521, then a close: never a 4xx, never silence. */
export function overloadSession(config: SessionConfig): Session {
  return newSession(config, "refuse", "overload");
}

/**
 * Trailing blanks trimmed from a line, at most: a courtesy to clients that add one or two (no
 * command needs them). A longer run stays, so the line is not a command, and costs nothing to scan.
 */
const TRIMMED_BLANKS = 64;

/**
 * The line in `bytes` from `start` to `stop` (its LF), without one CR, then without trailing
 * blanks, by a loop: a pattern such as /[ \t]+$/ costs a run of blanks squared.
 */
function lineText(bytes: Buffer, start: number, stop: number): string {
  let end = stop > start && bytes[stop - 1] === CR ? stop - 1 : stop;
  const least = Math.max(start, end - TRIMMED_BLANKS);
  while (end > least && (bytes[end - 1] === SPACE || bytes[end - 1] === TAB)) end--;
  return bytes.toString("latin1", start, end);
}

function finish(session: Session, send: string, lines: number, end: CoreEnd): Step {
  session.over = true;
  session.partial = null;
  return { send, lines, end };
}

function tooLong({ config, replies }: Session): string {
  return config.mode === "rcpt" ? replies.lineTooLong : replies.refuse;
}

/** SMTP verbs smtp521 knows but will not run (RFC 5321 §4.2.4: 502). */
const NOT_IMPLEMENTED = new Set(
  "VRFY EXPN HELP STARTTLS AUTH BDAT ETRN ATRN TURN SEND SOML SAML".split(" "),
);
const VERB = /^[A-Za-z]{1,8}$/;
// Arguments are read by search, not one pattern: one that fails late backtracks over the line.
const NOT_IN_PATH = /[^\x21-\x3b\x3d\x3f-\x7e]/;

/**
 * RFC 5321 §4.1.1.2-3: `FROM:<path>` or `TO:<path>` (one space allowed before `<`, as many
 * clients send it), then optional ESMTP parameters; the path, or null.
 */
function pathArgument(args: string, keyword: "FROM:" | "TO:"): string | null {
  if (args.slice(0, keyword.length).toUpperCase() !== keyword) return null;
  const lt = args.charCodeAt(keyword.length) === SPACE ? keyword.length + 1 : keyword.length;
  const gt = args.indexOf(">", lt);
  if (args[lt] !== "<" || gt < 0 || gt - lt + 1 > MAX_PATH) return null;
  // Parameters must follow a space; no extension is offered, so none is read or echoed.
  const badParameters = gt + 1 < args.length && args[gt + 1] !== " ";
  const path = args.slice(lt + 1, gt);
  return badParameters || NOT_IN_PATH.test(path) ? null : path;
}

function recipient({ config, replies }: Session, path: string): string {
  // RFC 5321 §4.1.1.3: a source route `@a,@b:` is ignored; the final domain decides.
  const mailbox = path.startsWith("@") ? path.slice(path.indexOf(":") + 1) : path;
  // RFC 5321 §4.5.1: `<Postmaster>` is this host, which takes no mail either.
  if (/^postmaster$/i.test(mailbox)) return rcptRefusal(config.rcptCode, config.name);
  const at = mailbox.lastIndexOf("@");
  if (at <= 0) return replies.badSyntax;
  const domain = checkedDomain(mailbox.slice(at + 1));
  if (!config.domains) return rcptRefusal(config.rcptCode, domain ?? config.name);
  if (!domain || !listed(config.domains, domain)) return replies.relayDenied;
  return rcptRefusal(config.rcptCode, domain);
}

/**
 * RFC 1846 §3: a relay dialog in which every recipient is refused. The only client text a reply
 * may carry is a recipient domain that `checkedDomain` accepted; else the server's own name.
 */
function rcptAnswer(session: Session, line: string): string {
  const { replies } = session;
  const space = line.indexOf(" ");
  const word = space < 0 ? line : line.slice(0, space);
  if (!VERB.test(word)) return replies.unknownCommand;
  const verb = word.toUpperCase();
  const args = space < 0 ? "" : line.slice(space + 1);
  switch (verb) {
    case "HELO":
    case "EHLO":
      if (!args) return replies.badSyntax;
      session.inTransaction = false; // RFC 5321 §4.1.4: a new EHLO resets the transaction
      return replies.hello;
    case "MAIL":
      if (pathArgument(args, "FROM:") === null) return replies.badSyntax;
      if (session.inTransaction) return replies.badSequence;
      session.inTransaction = true;
      return replies.ok;
    case "RCPT": {
      if (!session.inTransaction) return replies.badSequence;
      const to = pathArgument(args, "TO:");
      return to ? recipient(session, to) : replies.badSyntax;
    }
    case "DATA":
      if (!session.inTransaction) return replies.badSequence;
      return args ? replies.badSyntax : replies.noRecipients;
    case "RSET":
      if (args) return replies.badSyntax;
      session.inTransaction = false;
      return replies.ok;
    case "NOOP":
      return replies.ok;
    case "QUIT": // with arguments: QUIT alone ended the session before
      return replies.badSyntax;
    default:
      return NOT_IMPLEMENTED.has(verb) ? replies.notImplemented : replies.unknownCommand;
  }
}

/** Feed received bytes; bytes after the end are ignored. */
export function receive(session: Session, chunk: Uint8Array): Step {
  if (session.over || chunk.length === 0) return NOTHING;
  if (session.received === 0 && session.partial === null && chunk[0] === TLS_HANDSHAKE) {
    return finish(session, "", 0, "forbidden");
  }
  // A socket's chunk is a Buffer already; on Bun, a view's `.buffer` costs an allocation.
  const bytes = Buffer.isBuffer(chunk)
    ? chunk
    : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
  let [send, lines, start] = ["", 0, 0];
  for (let lf = bytes.indexOf(LF); lf >= 0; lf = bytes.indexOf(LF, start)) {
    const partial = session.partial;
    if ((partial?.length ?? 0) + lf - start + 1 > MAX_LINE) {
      return finish(session, send + tooLong(session), lines, "too-long");
    }
    const whole = partial && Buffer.concat([partial, bytes.subarray(start, lf)]);
    const line = whole ? lineText(whole, 0, whole.length) : lineText(bytes, start, lf);
    session.partial = null;
    start = lf + 1;
    lines++;
    if (++session.received === 1 && HTTP_REQUEST.test(line)) {
      return finish(session, send, lines, "forbidden");
    }
    // RFC 7504 §3: QUIT gets its 221 in every mode. RFC 1846 §4.2 b: any other line, the 521.
    if (QUIT.test(line)) return finish(session, send + session.replies.closing, lines, "quit");
    send += session.config.mode === "rcpt" ? rcptAnswer(session, line) : session.replies.refuse;
    if (session.received >= session.config.maxCommands) {
      return finish(session, send, lines, "limit");
    }
  }
  const rest = bytes.subarray(start);
  const partial = session.partial;
  if ((partial?.length ?? 0) + rest.length >= MAX_LINE) {
    return finish(session, send + tooLong(session), lines, "too-long");
  }
  if (rest.length) session.partial = partial ? Buffer.concat([partial, rest]) : Buffer.from(rest);
  return lines ? { send, lines, end: null } : NOTHING;
}

// === Transports =============================================================================
// Thin adapters that own sockets, timers and limits, and send only what the session core returns.

// --- Limits ----------------------------------------------------------------------------------

/** The defaults of `serve` and its `close`, and so of the flags that set them (`FLAGS`). */
const DEFAULTS = {
  mode: "greet",
  listen: [{ host: "", port: 25 }],
  maxConnections: 1000,
  maxPerIp: 10,
  timeoutMs: 300_000,
  maxDurationMs: 600_000,
  drainMs: 5000,
  rcptCode: 521,
  domains: null,
  log: () => {},
} as const;

/**
 * Lines per session by mode. A relay must take 100 recipients in one transaction (RFC 5321
 * §4.5.3.1.8), so `rcpt` mode allows EHLO, MAIL, 100 RCPT, DATA, QUIT and room to spare.
 */
export const MAX_COMMANDS: Readonly<Record<Mode, number>> = { greet: 20, close: 20, rcpt: 120 };

/** After the last reply, read and discard this long, then destroy (a lingering close). */
const LINGER_MS = 2000;
/** ...but read no more than this: what a flood sends past it waits in the kernel. */
const LINGER_BYTES = 64 * 1024;

// --- One conversation ------------------------------------------------------------------------

/** A byte stream both ways: a TCP socket, Deno's own connection, or stdin and stdout joined. */
interface Conduit {
  write(text: string): boolean;
  end(): void;
  end(last: string, done: () => void): void;
  destroy(): void;
  pause(): void;
  resume(): void;
  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "end" | "close" | "error", listener: () => void): void;
  once(event: "drain", listener: () => void): void;
}

/** A session on its conduit, as the transport and the deadlines see it. */
interface Conversation {
  readonly conduit: Conduit;
  readonly session: Session;
  readonly started: number;
  at: number; // when the deadlines act: idle or whole-life deadline, then the end of the linger
  slot: number; // the place in the deadlines' list
  end: EndReason | null; // set once the last reply is out: it lingers, then ends for this reason
}

/**
 * Send the last reply and a FIN, then read and discard for LINGER_MS before destroying, so a
 * client still sending gets the reply, not a reset that eats it.
 */
function linger(conversation: Conversation, reason: EndReason): void {
  if (conversation.end) return;
  conversation.end = reason;
  conversation.conduit.end();
  conversation.at = Date.now() + LINGER_MS;
}

/** Destroy now; a lingering conversation keeps the reason it already has. */
function stop(conversation: Conversation, reason: EndReason): void {
  conversation.end ??= reason;
  conversation.conduit.destroy();
}

/**
 * Every session's deadline on one interval timer, not a timer each (memory per connection). It
 * stops at the first sweep that finds no session open, so a finished stdio session lets the
 * process exit. The sessions watched are an array with swap-remove: a Set rehashing under churn
 * kept finished sockets alive through V8 scavenges (bench/HISTORY.md).
 */
function deadlines(idleMs: number, maxDurationMs: number) {
  const periodMs = Math.max(20, Math.min(idleMs, maxDurationMs, LINGER_MS) / 10);
  const watched: Conversation[] = [];
  let timer: ReturnType<typeof setInterval> | undefined;
  const sweep = () => {
    const now = Date.now();
    // Backwards: a stopped session may leave at once, moving the last one into its slot.
    for (let i = watched.length - 1; i >= 0; i--) {
      if (watched[i]?.at <= now) stop(watched[i], "timeout");
    }
    if (watched.length === 0) timer = void clearInterval(timer);
  };
  return {
    add(conversation: Conversation) {
      conversation.slot = watched.push(conversation) - 1;
      timer ??= setInterval(sweep, periodMs);
    },
    remove(conversation: Conversation) {
      const last = watched.pop()!;
      if (last !== conversation) watched[last.slot = conversation.slot] = last;
    },
    /** RFC 5321 §4.5.3.2.7: the idle time-out restarts with each line, never past the life. */
    restart(conversation: Conversation) {
      conversation.at = Math.min(Date.now() + idleMs, conversation.started + maxDurationMs);
    },
    /** Close every open session now, for this reason. */
    stopAll: (reason: EndReason) =>
      [...watched].forEach((conversation) => stop(conversation, reason)),
    /** Stop the timer now, not at its next sweep, if no session is open (a server closing). */
    release: () => watched.length === 0 && (timer = void clearInterval(timer)),
  };
}
type Deadlines = ReturnType<typeof deadlines>;

function perform(conversation: Conversation, step: Step, clock: Deadlines): void {
  const { conduit } = conversation;
  if (step.send && !conduit.write(step.send) && !step.end) {
    conduit.pause(); // a pipelining peer that does not read is not read either
    conduit.once("drain", () => conduit.resume());
  }
  if (step.end) linger(conversation, step.end);
  else if (step.lines) clock.restart(conversation);
}

type Ended = (conversation: Conversation) => void;

/**
 * Run one session over a conduit: send what the core returns, pause reading while the peer does
 * not read, keep the deadlines, close lingering, and call `ended` once the conduit has closed.
 */
function converse(conduit: Conduit, session: Session, clock: Deadlines, ended: Ended) {
  const started = Date.now();
  const conversation: Conversation = { conduit, session, started, at: started, slot: 0, end: null };
  let discarded = 0; // bytes read and discarded while lingering
  clock.restart(conversation);
  clock.add(conversation);
  conduit.on("data", (chunk) => {
    if (conversation.end === null) perform(conversation, receive(session, chunk), clock);
    else if ((discarded += chunk.length) > LINGER_BYTES) conduit.pause();
  });
  // A TCP socket ends its own side when the client's FIN comes, then closes; stdin and stdout
  // joined, and Deno's connection, must be told.
  if (!(conduit instanceof Socket)) conduit.on("end", () => linger(conversation, "client-closed"));
  conduit.on("error", () => stop(conversation, "reset"));
  conduit.on("close", () => {
    clock.remove(conversation);
    conversation.end ??= "client-closed"; // no reason by now: the client's FIN ended it
    ended(conversation);
  });
  perform(conversation, session.greeting, clock);
}

// --- Listeners -------------------------------------------------------------------------------

/** Where to listen: an address and port ("" = every address), or an inherited socket. */
export type ListenAddress = Readonly<{ host: string; port: number } | { fd: number }>;

type Errno = NodeJS.ErrnoException;
type SocketEnds = "remoteAddress" | "remotePort" | "localAddress" | "localPort";
/** A connection: its byte stream, and its two ends where the runtime knows them. */
type Connection = Conduit & Partial<Pick<Socket, SocketEnds>>;

/** A bound listener: `start` hands on each connection, and any trouble accepting. */
type Listener = {
  readonly address: AddressInfo;
  start(accepted: (connection: Connection) => void, failed: (error: Errno) => void): void;
  close(): void;
};

function bindNode(where: ListenAddress): Promise<Listener> {
  const server = createServer();
  return new Promise((resolve, reject) => {
    server.once("error", reject).listen("fd" in where ? { fd: where.fd } : where, () => {
      server.off("error", reject);
      resolve({
        address: server.address() as AddressInfo,
        start: (accepted, failed) => server.on("connection", accepted).on("error", failed),
        close: () => server.close(),
      });
    });
  });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Deno: read a line's worth at once (MAX_LINE); a held connection holds this buffer. */
const DENO_READ_BYTES = 1024;
/** Deno: past this many bytes not yet written, `write` says "wait for drain", as node:net does. */
const DENO_HIGH_WATER = 64 * 1024;

/**
 * A Deno connection as a Conduit: node:net's events over Deno's promises. `converse` sets one
 * listener per event (and resumes at every drain), so they are kept in a plain object.
 */
function denoConnection(conn: DenoConn): Connection {
  const on: Record<string, ((chunk?: Uint8Array) => void) | undefined> = {};
  const listen = (event: string, listener: (chunk?: Uint8Array) => void) => on[event] = listener;
  let writes: Promise<void> | null = null; // the writes in flight, in order
  let [queued, paused, gone, ourEnd, theirEnd] = [0, false, false, false, false];
  let wake: (() => void) | undefined; // the reader, waiting while paused
  const destroy = () => {
    if (gone) return;
    gone = true;
    try {
      conn.close();
    } catch { /* already closed by the runtime */ }
    wake?.();
    on.close?.();
  };
  const failed = () => {
    if (!gone) on.error?.();
    destroy();
  };
  /** Run `next` after the writes in flight. */
  const then = (next: () => Promise<unknown>) => {
    const chained: Promise<void> = (writes ? writes.then(next) : next()).then(() => {
      if (writes === chained) writes = null;
    }, failed);
    writes = chained;
  };
  // Both sides ended and everything written: nothing is left to linger for.
  const closeIfDone = () => ourEnd && theirEnd && (writes ? writes.then(destroy) : destroy());
  const write = (text: string) => {
    const bytes = Buffer.from(text, "latin1");
    queued += bytes.length;
    then(async () => {
      for (let sent = 0; sent < bytes.length;) sent += await conn.write(bytes.subarray(sent));
      if ((queued -= bytes.length) === 0) on.drain?.();
    });
    return queued < DENO_HIGH_WATER;
  };
  (async () => {
    const buffer = Buffer.alloc(DENO_READ_BYTES);
    while (!gone) {
      if (paused) await new Promise<void>((resolve) => wake = resolve);
      const n = paused || gone ? 0 : await conn.read(buffer).catch(() => undefined);
      if (n === undefined) return failed();
      if (n === null) {
        theirEnd = true;
        on.end?.();
        return closeIfDone();
      }
      if (n && !gone) on.data?.(buffer.subarray(0, n));
    }
  })();
  return {
    remoteAddress: conn.remoteAddr.hostname,
    remotePort: conn.remoteAddr.port,
    localAddress: conn.localAddr.hostname,
    on: listen,
    once: listen,
    write,
    destroy,
    end(last?: string, done?: () => void) {
      if (last) write(last);
      ourEnd = true;
      then(() => conn.closeWrite().then(done));
      closeIfDone();
    },
    pause: () => void (paused = true),
    resume() {
      paused = false;
      wake?.();
    },
  } as Connection;
}

/**
 * Deno's own listener. Deno's node:net listener stops accepting for good after one EMFILE and
 * loses the greeting of a client that half-closes at once; `Deno.listen` reports EMFILE and
 * goes on once descriptors free up.
 */
function bindDeno({ host, port }: { host: string; port: number }): Listener {
  const listener = deno!.listen({ hostname: host, port, transport: "tcp" });
  const { hostname: address } = listener.addr;
  let accepting = true;
  return {
    address: { address, family: address.includes(":") ? "IPv6" : "IPv4", port: listener.addr.port },
    async start(accepted, failed) {
      while (accepting) {
        const conn = await listener.accept().catch((error: Errno) => error);
        if (!(conn instanceof Error)) accepted(denoConnection(conn));
        else if (accepting) {
          failed(conn);
          await sleep(100); // out of descriptors: try again once some may be free
        }
      }
    },
    close() {
      if (accepting) listener.close(); // once: a second signal closes the server again
      accepting = false;
    },
  };
}

function bindOne(where: ListenAddress): Promise<Listener> {
  if (!deno || "fd" in where) return bindNode(where);
  return new Promise((resolve) => resolve(bindDeno(where))); // a failure to bind rejects
}

/** "Every address" is `::` (IPv4 too), or `0.0.0.0` where IPv6 is absent. */
async function bind(where: ListenAddress): Promise<Listener> {
  if ("fd" in where || where.host) return await bindOne(where);
  return await bindOne({ host: "::", port: where.port }).catch((error: Errno) => {
    if (error.code !== "EAFNOSUPPORT" && error.code !== "EADDRNOTAVAIL") throw error;
    return bindOne({ host: "0.0.0.0", port: where.port });
  });
}

type Fields = Readonly<Record<string, string | number>>;
/** Structured log: an event, its fields, and when it happened if not now (ms since the epoch). */
export type Log = (event: string, fields: Fields, at?: number) => void;

/** The options of `serve`, set by the flags of the same names (README "Flags"). */
export interface ServeOptions {
  /** @default "greet" */
  readonly mode?: Mode;
  /** The name in replies. @default the system's FQDN, else each connection's local address */
  readonly hostname?: string;
  /** @default [{ host: "", port: 25 }] (IPv6 and IPv4, or IPv4 alone without IPv6) */
  readonly listen?: readonly ListenAddress[];
  /** Lines per session. @default MAX_COMMANDS[mode]: 20; 120 in `rcpt` mode */
  readonly maxCommands?: number;
  /** Open session sockets, lingering ones included. @default 1000 */
  readonly maxConnections?: number;
  /** Open session sockets from one IPv4 address or IPv6 /64. @default 10 */
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

/** The name in replies, and where it came from: `--hostname`, `system` or `local-address`. */
type Name = { readonly value: string; readonly source: string };

export interface Smtp521Server {
  readonly addresses: readonly AddressInfo[]; // bound, with their actual ports
  readonly name: Name; // the name in replies
  connections(): number; // open session sockets, lingering ones included
  /** Stop accepting, let sessions end for `drainMs`, close the rest; sessions by end reason. */
  close(drainMs?: number): Promise<Record<string, number>>;
}

/** The flag's name, else a fully qualified system name; null: each connection's local address. */
function fixedName(hostname: string | undefined): Name | null {
  if (hostname) return { value: hostname, source: "--hostname" };
  const system = systemName();
  return system?.includes(".") ? { value: system, source: "system" } : null;
}

/** What a session's log line says of its connection: the client, and the port it reached. */
type Ends = { readonly remote: string; readonly local_port: number | string };

/** The options with every default filled in, a session config for a name, and the session log. */
function settle<T extends ServeOptions>(options: T) {
  // An option given as undefined takes its default, as if it were left out.
  const given = Object.entries(options).filter(([, value]) => value !== undefined);
  const settings = { ...DEFAULTS, ...Object.fromEntries(given) as T };
  const { mode, rcptCode, domains, log } = settings;
  const maxCommands = options.maxCommands ?? MAX_COMMANDS[mode];
  const config = (name: string): SessionConfig => ({ mode, name, maxCommands, rcptCode, domains });
  /** The one line of a finished session, over TCP and stdio alike (README "Logs and signals"). */
  const logSession = (ends: Ends, end: EndReason, conversation?: Conversation) => {
    const at = Date.now();
    const duration_ms = conversation ? at - conversation.started : 0;
    const lines = conversation?.session.received ?? 0;
    log("session", { ...ends, mode, duration_ms, lines, end }, at);
  };
  return { ...settings, config, logSession };
}

/** Descriptors the runtime itself holds (event loop, stdio, workers), with room to spare. */
const RESERVED_DESCRIPTORS = 32;

/**
 * How many sockets fit under the descriptor limit (Linux, where it may be read). Staying under
 * it keeps Node's and Bun's accept loops off EMFILE, which they absorb silently.
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

/** Serve smtp521 on TCP until `close()`. Rejects if any address cannot be bound. */
export async function serve(options: ServeOptions = {}): Promise<Smtp521Server> {
  const settings = settle(options);
  const name = fixedName(settings.hostname);
  const fixedConfig = name && settings.config(name.value);
  const clock = deadlines(settings.timeoutMs, settings.maxDurationMs);
  const perNetwork = new Map<string, number>();
  const endings: Record<string, number> = {};
  const room = descriptorRoom();
  // Open sessions within the limits, and over them (greeted with the 521, then closed).
  let [admitted, overloaded, lastWarning] = [0, 0, 0];

  const record = (ends: Ends, end: EndReason, conversation?: Conversation) => {
    endings[end] = (endings[end] ?? 0) + 1;
    settings.logSession(ends, end, conversation);
  };

  /** Trouble accepting (out of descriptors) is logged at most once a second. */
  const warn = (error: string, detail: string) => {
    if (Date.now() - lastWarning < 1000) return;
    lastWarning = Date.now();
    settings.log("error", { error, detail });
  };

  /** A connection on a listener bound to `localIp` (if not a wildcard) and `local_port`. */
  const accept = (connection: Connection, localIp: string | undefined, local_port: number) => {
    const ip = connection.remoteAddress ? plainAddress(connection.remoteAddress) : "";
    const local = localIp ?? connection.localAddress;
    const ends = { remote: ip ? hostPort(ip, connection.remotePort ?? 0) : "-", local_port };
    if (!ip || !local) { // reset while it waited to be accepted
      connection.destroy();
      return record(ends, "reset");
    }
    const config = fixedConfig || settings.config(addressLiteral(local));
    const network = clientNetwork(ip);
    const fromNetwork = perNetwork.get(network) ?? 0;
    const overLimit = admitted >= settings.maxConnections || fromNetwork >= settings.maxPerIp;
    const full = admitted + overloaded >= room;
    if (full) warn("EMFILE", `near the descriptor limit: ${admitted + overloaded} sockets open`);
    if (full || (overLimit && overloaded >= settings.maxConnections)) {
      // Even the lingering of refusals is bounded; past it, greet and drop.
      connection.on("error", () => {});
      connection.end(overloadSession(config).greeting.send, () => connection.destroy());
      return record(ends, "overload");
    }
    if (overLimit) overloaded++;
    else {
      admitted++;
      perNetwork.set(network, fromNetwork + 1);
    }
    converse(connection, (overLimit ? overloadSession : createSession)(config), clock, (ended) => {
      if (overLimit) overloaded--;
      else {
        admitted--;
        const left = perNetwork.get(network)! - 1;
        if (left) perNetwork.set(network, left);
        else perNetwork.delete(network);
      }
      record(ends, ended.end!, ended);
    });
  };

  const listeners: Listener[] = [];
  try {
    for (const where of settings.listen) listeners.push(await bind(where));
  } catch (error) {
    listeners.forEach((listener) => listener.close());
    const where = settings.listen[listeners.length];
    const listen = "fd" in where ? `fd:${where.fd}` : hostPort(where.host || "::", where.port);
    throw Object.assign(error as Error, { listen });
  }
  for (const { address, start } of listeners) {
    // The listener's own address and port stand for the socket's, saving a getsockname each.
    const localIp = ["::", "0.0.0.0", ""].includes(address.address) ? undefined : address.address;
    const failed = (error: Errno) => warn(error.code ?? "accept", error.message);
    start((connection) => accept(connection, localIp, address.port), failed);
  }

  async function close(drainMs = DEFAULTS.drainMs): Promise<Record<string, number>> {
    listeners.forEach((listener) => listener.close());
    const deadline = Date.now() + drainMs;
    while (admitted + overloaded > 0 && Date.now() < deadline) await sleep(50);
    clock.stopAll("shutdown");
    while (admitted + overloaded > 0) await sleep(10);
    clock.release();
    return endings;
  }

  return {
    addresses: listeners.map((listener) => listener.address),
    name: name ?? { value: "[local address of each connection]", source: "local-address" },
    connections: () => admitted + overloaded,
    close,
  };
}

// --- Stdio -----------------------------------------------------------------------------------

export type StdioOptions = Omit<ServeOptions, "listen" | "maxConnections" | "maxPerIp">;

/**
 * Stdin and stdout as one conduit. Where they are one socket (inetd, systemd `Accept=yes`,
 * socat), its addresses name the ends, and on Node the session runs over that socket, for a real
 * half-close. Bun cannot open descriptor 0 as a socket, and Deno's node:net socket loses the
 * greeting of a client that half-closes at once: there the session runs over both joined.
 */
function stdioConduit(): Connection {
  const [input, output] = [fstatSync(0), fstatSync(1)];
  const oneSocket = input.isSocket() && input.dev === output.dev && input.ino === output.ino;
  if (oneSocket && !bun && !deno) return new Socket({ fd: 0, readable: true, writable: true });
  const joined = Duplex.from({ readable: process.stdin, writable: process.stdout });
  if (!oneSocket || bun) return joined;
  const socket = new Socket({ fd: 0, readable: false }); // only to read its two ends
  const { localAddress, localPort, remoteAddress, remotePort } = socket;
  return Object.assign(joined, { localAddress, localPort, remoteAddress, remotePort });
}

/**
 * `--stdio`: one session on standard input and output, as inetd, xinetd, systemd `Accept=yes`,
 * tcpserver and socat run it. `done` resolves with the end reason once the session is over and
 * its replies are flushed.
 */
export function serveStdio(options: StdioOptions = {}) {
  const settings = settle(options);
  const conduit = stdioConduit();
  // The socket's own addresses where it has them; else tcpserver's and systemd's variables.
  const env = (...names: string[]) => names.map(readEnv).find((value) => value !== undefined);
  const ip = conduit.remoteAddress ?? env("TCPREMOTEIP", "REMOTE_ADDR", "REMOTE_HOST");
  const port = conduit.remotePort ?? env("TCPREMOTEPORT", "REMOTE_PORT") ?? "-";
  const remote = ip ? hostPort(plainAddress(ip), port) : "-";
  const ends = { remote, local_port: conduit.localPort ?? env("TCPLOCALPORT") ?? "-" };
  const local = conduit.localAddress ?? env("TCPLOCALIP");
  const name = fixedName(settings.hostname)?.value ??
    (local && isIP(plainAddress(local)) ? addressLiteral(local) : null) ??
    checkedDomain(env("TCPLOCALHOST") ?? "") ?? systemName();
  if (!name) {
    settings.log("warning", { detail: "no name for replies: using localhost; pass --hostname" });
  }
  const clock = deadlines(settings.timeoutMs, settings.maxDurationMs);
  const done = new Promise<EndReason>((resolve) => {
    converse(conduit, createSession(settings.config(name ?? "localhost")), clock, (ended) => {
      settings.logSession(ends, ended.end!, ended);
      resolve(ended.end!);
    });
  });
  return { done, stop: clock.stopAll };
}

// === Options ================================================================================
// The flags parseArgs takes, with `DEFAULTS` as their defaults; --help and README "Flags" say the
// same (the tests hold them to it). A bad flag or value: one line naming it, and exit 2.

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
  --max-per-ip N            open sessions from one address or IPv6 /64 (default 10)
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
  mode: { type: "string", default: DEFAULTS.mode },
  hostname: { type: "string" },
  listen: { type: "string", multiple: true },
  port: { type: "string" },
  stdio: { type: "boolean", default: false },
  domains: { type: "string" },
  "rcpt-code": { type: "string", default: String(DEFAULTS.rcptCode) },
  "max-commands": { type: "string" },
  "max-connections": { type: "string", default: String(DEFAULTS.maxConnections) },
  "max-per-ip": { type: "string", default: String(DEFAULTS.maxPerIp) },
  timeout: { type: "string", default: String(DEFAULTS.timeoutMs / 1000) },
  "max-duration": { type: "string", default: String(DEFAULTS.maxDurationMs / 1000) },
  drain: { type: "string", default: String(DEFAULTS.drainMs / 1000) },
  user: { type: "string" },
  log: { type: "string", default: "text" },
  help: { type: "boolean", short: "h", default: false },
  version: { type: "boolean", default: false },
} as const;

export type LogFormat = "text" | "json" | "off";

/** A configuration error: names the flag and the fix (exit 2). */
export type UsageError = { readonly error: string };

const isError = (value: unknown): value is UsageError =>
  typeof value === "object" && value !== null && "error" in value;

/** Stop parsing with the error for `--flag` (parseOptions catches it and returns it). */
function fail(flag: string, why: string): never {
  throw { error: `--${flag}: ${why}` } satisfies UsageError;
}

function choice<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if ((allowed as readonly string[]).includes(value)) return value as T;
  return fail(flag, `"${value}" is not one of ${allowed.join(", ")}`);
}

function count(flag: string, value: string, max: number): number {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  return n >= 1 && n <= max ? n : fail(flag, `"${value}" must be a whole number from 1 to ${max}`);
}

function seconds(flag: string, value: string): number {
  const n = /^\d+(\.\d+)?$/.test(value) ? Number(value) : NaN;
  if (n >= 0.1 && n <= 86_400) return Math.round(n * 1000);
  return fail(flag, `"${value}" must be seconds from 0.1 to 86400`);
}

/** `ADDR:PORT`, `[IPv6]:PORT`, `:PORT` or `fd:N`. */
function listenAddress(value: string): ListenAddress {
  const fd = /^fd:(\d+)$/.exec(value);
  if (fd) return { fd: Number(fd[1]) };
  const parts = /^(?:\[([0-9a-fA-F:.]+)\]|(\d+\.\d+\.\d+\.\d+))?:(\d+)$/.exec(value);
  const host = parts?.[1] ?? parts?.[2] ?? "";
  const port = Number(parts?.[3]);
  if (parts && (!host || isIP(host)) && port <= 65535) return { host, port };
  return fail(
    "listen",
    `"${value}" is not ADDR:PORT, [IPv6]:PORT, :PORT or fd:N (e.g. 192.0.2.1:25)`,
  );
}

type FlagValues = ReturnType<typeof parseArgs<{ options: typeof FLAGS; strict: true }>>["values"];

/** Each value checked, in the order of --help; then the flags that do not go together. */
function checkedOptions(values: FlagValues) {
  const { hostname, domains, user, port, stdio, help, version } = values;
  const mode = choice("mode", values.mode, ["greet", "close", "rcpt"] as const);
  const logFormat = choice("log", values.log, ["text", "json", "off"] as const);
  const rcptCode = Number(choice("rcpt-code", values["rcpt-code"], ["521", "556"])) as RcptCode;
  const given = values["max-commands"];
  const maxCommands = given === undefined ? MAX_COMMANDS[mode] : count("max-commands", given, 1000);
  const maxConnections = count("max-connections", values["max-connections"], 1_000_000);
  const maxPerIp = count("max-per-ip", values["max-per-ip"], 1_000_000);
  const timeoutMs = seconds("timeout", values.timeout);
  const maxDurationMs = seconds("max-duration", values["max-duration"]);
  const drainMs = seconds("drain", values.drain);
  if (port !== undefined && !(/^\d+$/.test(port) && Number(port) <= 65535)) {
    fail("port", `"${port}" is not a port number from 0 to 65535`);
  }
  const listen = port === undefined
    ? values.listen?.map(listenAddress) ?? [...DEFAULTS.listen]
    : [listenAddress(`:${port}`)];
  if (port !== undefined && values.listen) {
    fail("port", "give either --port or --listen, not both");
  }
  const name = hostname === undefined ? undefined : checkedDomain(hostname);
  if (name === null) {
    const example = "(e.g. ntp1.example.org or [192.0.2.1])";
    fail("hostname", `"${hostname}" is not a domain name or address literal ${example}`);
  }
  const list = domains === undefined ? null : parseDomainList(domains);
  if (typeof list === "string") {
    const what = "is not a domain, .domain or address literal list (e.g. a.example,.b.example)";
    fail("domains", `"${list}" ${what}`);
  }
  if (list && mode !== "rcpt") {
    fail("domains", "only rcpt mode reads recipients; add --mode rcpt");
  }
  if (rcptCode === 556 && mode !== "rcpt") {
    fail("rcpt-code", "only rcpt mode answers recipients; add --mode rcpt");
  }
  if (user !== undefined && !/^[^:]+(?::[^:]+)?$/.test(user)) {
    fail("user", `"${user}" is not NAME or NAME:GROUP (names or numeric ids, e.g. nobody)`);
  }
  if (stdio && (values.listen || port !== undefined)) {
    fail("stdio", "serves one session on stdin/stdout; drop --listen and --port");
  }
  const limits = { maxCommands, maxConnections, maxPerIp, timeoutMs, maxDurationMs, drainMs };
  const rest = { stdio, user, logFormat, help, version };
  return { mode, hostname: name, listen, domains: list, rcptCode, ...limits, ...rest };
}

export type Options = ReturnType<typeof checkedOptions>;

/** Parse the server's flags. */
export function parseOptions(args: readonly string[]): Options | UsageError {
  try {
    return checkedOptions(parseArgs({ args: [...args], options: FLAGS, strict: true }).values);
  } catch (error) {
    if (isError(error)) return error;
    const { code, message } = error as NodeJS.ErrnoException;
    if (!code?.startsWith("ERR_PARSE_ARGS")) throw error;
    const flag = /'([^' ]+)/.exec(message)?.[1] ?? String(args[0]);
    const why = code === "ERR_PARSE_ARGS_UNKNOWN_OPTION"
      ? "unknown flag"
      : code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL"
      ? "unexpected argument"
      : /does not take an argument/.test(message)
      ? "takes no value"
      : "needs a value";
    return { error: `${flag}: ${why}; see --help` };
  }
}

// === Logs ===================================================================================
// One line per event on standard error, never standard output (under --stdio, the session).

/** A logfmt value that needs no quotes: printable ASCII without space, `"`, `=` or `\`. */
const BARE = /^[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+$/;

function logfmt(value: string | number): string {
  return typeof value === "number" || BARE.test(value) ? String(value) : JSON.stringify(value);
}

export function formatLine(
  format: "text" | "json",
  event: string,
  fields: Fields,
  at = Date.now(),
) {
  const time = new Date(at).toISOString();
  if (format === "json") return JSON.stringify({ time, event, ...fields }) + "\n";
  let line = `time=${time} event=${event}`;
  for (const key in fields) line += ` ${key}=${logfmt(fields[key])}`;
  return line + "\n";
}

/** Lines wait this long to be written together: a write per session costs CPU. */
const LOG_BATCH_MS = 50;
/** Log text waiting for a slow or stalled reader, at most; past it, lines are dropped. */
const LOG_BACKLOG = 1024 * 1024;
/** How long the last lines may take to leave at exit. */
const LOG_EXIT_MS = 2000;

/** Hands bytes to the log's sink, then calls back once, with the error if they were lost. */
export type LogSink = (bytes: Uint8Array, done: (error: Error | null) => void) => void;

/**
 * Write all of `bytes` to standard error, then call back. A pipe or socket may take part of them,
 * or none for now (EAGAIN: Node makes them non-blocking): the rest is tried again later. Deno's
 * node:fs write to a full pipe stops its event loop, so Deno writes with its own API.
 */
function writeStderr(bytes: Uint8Array, done: (error: Error | null) => void): void {
  const rest = (written: number) =>
    written === bytes.length ? done(null) : writeStderr(bytes.subarray(written), done);
  if (deno) return void deno.stderr.write(bytes).then(rest, done);
  write(2, bytes, 0, bytes.length, null, (error, written) => {
    if (error?.code === "EAGAIN") setTimeout(() => writeStderr(bytes, done), LOG_BATCH_MS);
    else if (error) done(error);
    else rest(written);
  });
}

/**
 * A log to standard error (or `sink`), one write at a time. The log is never a way to stop the
 * service: a sink that fails (EPIPE once the reader of a pipe is gone, ENOSPC behind a redirect)
 * or stalls costs dropped lines, counted, never a crash or unbounded memory. The first write that
 * gets through after a loss says how many lines were lost; `dropped` counts them all, for the
 * stop line. `flush` waits for what it holds (call it before exit).
 */
export function createLog(format: LogFormat, sink: LogSink = writeStderr) {
  let [backlog, lines, writing, unreported, dropped] = ["", 0, false, 0, 0];
  let timer: ReturnType<typeof setTimeout> | undefined;
  const flushed: (() => void)[] = [];
  const lose = (lines: number) => {
    unreported += lines;
    dropped += lines;
  };
  const pump = () => {
    timer = undefined;
    if (writing) return;
    if (!backlog) return flushed.splice(0).forEach((resolve) => resolve());
    const reported = unreported;
    const notice = reported && format !== "off"
      ? formatLine(format, "log", { dropped: reported })
      : "";
    const [bytes, batch] = [Buffer.from(notice + backlog), lines];
    [backlog, lines, writing] = ["", 0, true];
    sink(bytes, (error) => {
      writing = false;
      if (error) lose(batch);
      else unreported -= reported;
      pump();
    });
  };
  const log: Log = (event, fields, at) => {
    if (format === "off") return;
    const line = formatLine(format, event, fields, at);
    if (backlog.length + line.length > LOG_BACKLOG) return lose(1);
    backlog += line;
    lines++;
    timer ??= setTimeout(pump, LOG_BATCH_MS);
  };
  const flush = () =>
    new Promise<void>((resolve) => {
      flushed.push(resolve);
      setTimeout(resolve, LOG_EXIT_MS).unref();
      pump();
    });
  return { log, flush, dropped: () => dropped };
}

// === Main ===================================================================================
// A server, or one stdio session, until SIGTERM or SIGINT.

/** The fix for a listen failure, by cause. */
const LISTEN_FIXES: Record<string, string> = {
  EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE (systemd AmbientCapabilities=, " +
    "setcap), or use a port above 1023",
  EADDRINUSE: "another server (an MTA?) holds that port: stop it, or choose another --listen",
  EADDRNOTAVAIL: "no interface has that address: check --listen",
  EBADF: "no socket was passed on that descriptor: start from a systemd .socket unit, " +
    "or use --listen ADDR:PORT",
  ENOTSOCK: "that descriptor is not a socket: start from a systemd .socket unit, " +
    "or use --listen ADDR:PORT",
};

/** What this runtime cannot do safely, by flag (exit 2). */
function unsupported({ listen, user }: Options): string | null {
  if (deno && listen.some((where) => "fd" in where)) {
    return "--listen fd:N: Deno cannot accept on an inherited socket; use --stdio with systemd " +
      "Accept=yes, or --listen ADDR:PORT";
  }
  if (deno && user) {
    return "--user: Deno has no setgroups, so it cannot drop privileges safely; use systemd " +
      "User= or DynamicUser=, or run under Node or Bun";
  }
  return null;
}

/** The primary group of a user, by name or uid, from /etc/passwd. */
function primaryGroup(user: string | number): number | undefined {
  const users = readFileSync("/etc/passwd", "latin1").split("\n").map((line) => line.split(":"));
  const entry = users.find((fields) => fields[typeof user === "string" ? 0 : 2] === String(user));
  return entry?.[3] ? Number(entry[3]) : undefined;
}

/**
 * `--user NAME[:GROUP]`, names or numeric ids: supplementary groups, gid, then uid, after
 * binding (Node, Bun). A user named by number may have no passwd entry to take groups from: its
 * only group is then the one given.
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

/** `--user`, if given: the ids then in force (for the start line), or why it failed (exit 1). */
function switchUser(spec: string | undefined): Record<string, string | number> | UsageError {
  try {
    return spec ? dropPrivileges(spec) : {};
  } catch (error) {
    return { error: `--user: ${(error as Error).message}` };
  }
}

/** Text on stderr (after the program's name) or stdout, then the exit code, once it is out. */
function say(text: string, code: number, to: NodeJS.WritableStream = process.stderr) {
  const line = to === process.stderr ? `smtp521: ${text}\n` : text;
  return new Promise<number>((resolve) => to.write(line, () => resolve(code)));
}

/** The first SIGTERM or SIGINT resolves; each later one calls `again` (stop draining). */
function signalled(again: () => void): Promise<string> {
  let first = true;
  return new Promise((resolve) => {
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
  process.stderr.on("error", () => {}); // a closed standard error is never fatal (the log counts)
  if (args[0] === "probe") {
    const example = "deno run --allow-net probe.ts --domain ntp1.example.org";
    return await say(
      `probe: the probe is its own file: run probe.ts from a workstation (e.g. ${example})`,
      2,
    );
  }
  const options = parseOptions(args);
  if (isError(options)) return await say(options.error, 2);
  if (options.help) return await say(USAGE, 0, process.stdout);
  if (options.version) return await say(`smtp521 ${VERSION}\n`, 0, process.stdout);
  const cannot = unsupported(options);
  if (cannot) return await say(cannot, 2);
  const { log, flush, dropped } = createLog(options.logFormat);
  process.on("SIGHUP", () => log("signal", { signal: "SIGHUP", action: "ignored" }));

  if (options.stdio) {
    const ids = switchUser(options.user); // before the session: inetd may start it as root
    if (isError(ids)) return await say(ids.error, 1);
    const session = serveStdio({ ...options, log });
    const stop = () => session.stop("shutdown");
    signalled(stop).then(stop);
    await session.done;
    await flush();
    return 0;
  }

  let server: Smtp521Server;
  try {
    server = await serve({ ...options, log });
  } catch (error) {
    const { code, message, listen = "-" } = error as NodeJS.ErrnoException & { listen?: string };
    const fix = LISTEN_FIXES[code ?? ""] ?? "check --listen";
    if (options.logFormat !== "json") {
      return await say(`cannot listen on ${listen}: ${code ?? message}; ${fix}`, 1);
    }
    log("error", { listen, error: code ?? message, fix });
    await flush();
    return 1;
  }
  const ids = switchUser(options.user);
  if (isError(ids)) {
    await server.close(0);
    return await say(ids.error, 1);
  }
  const listen = server.addresses.map((a) => hostPort(a.address, a.port)).join(",");
  const { value: name, source: name_source } = server.name;
  const what = { version: VERSION, runtime: RUNTIME, mode: options.mode, name, name_source };
  log("start", { ...what, listen, ...ids, pid: process.pid });
  const signal = await signalled(() => server.close(0));
  const endings = await server.close(options.drainMs);
  const sessions = Object.values(endings).reduce((sum, n) => sum + n, 0);
  log("stop", { signal, sessions, ...endings, ...(dropped() ? { log_dropped: dropped() } : {}) });
  await flush();
  return 0;
}

if (import.meta.main) main(process.argv.slice(2)).then((code) => process.exit(code));
