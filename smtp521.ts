#!/usr/bin/env -S deno run --allow-net --no-prompt
/**
 * smtp521: an SMTP server for hosts that never receive mail.
 *
 * A host with nothing on port 25 makes senders queue misaddressed mail for days
 * (a refused connection is a temporary failure). smtp521 answers with a
 * permanent "521 <host> does not accept mail" instead, so the sender returns
 * the message at once with a clear reason.
 *
 *   RFC 1846  SMTP 521 Reply Code (the modes: §3, §4.1, §4.2)
 *   RFC 7504  SMTP 521 and 556 Reply Codes (§3: 521 greeting, 556 at RCPT)
 *   RFC 5321  SMTP (line, path and time-out limits: §4.5.3)
 *   RFC 7505  Null MX (publish it too, where you control DNS)
 *
 * Usage (one file, no dependencies; Deno, Node >= 22.18 or Bun; README.md has
 * the rest; probe.ts, beside this file, checks a host from a workstation):
 *
 *   deno run --allow-net smtp521.ts [--mode greet|close|rcpt] [flags]
 *   node smtp521.ts --port 2525 --hostname ntp1.example
 *   bun smtp521.ts --stdio                      # from inetd / systemd Accept=yes
 *
 * As a library: `createSession` and `receive` are the protocol as a pure state
 * machine (bytes in; replies and "close now" out); `serve` runs it on TCP and
 * `serveStdio` on standard input and output. It never connects anywhere.
 *
 * The file reads in the order data flows: runtime, reply table, names, session
 * core, transports (limits, one conversation, listeners, stdio), options, logs,
 * main. Each part uses only what comes before it.
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

// ---------------------------------------------------------------------------
// Runtime. Under Deno with only --allow-net, reading the host name, the
// environment or a file would prompt (freezing the event loop) or throw: each
// is asked of the permission API first, which never prompts.
// ---------------------------------------------------------------------------

type PermissionQuery = { name: string; kind?: string; variable?: string; path?: string };
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
interface DenoGlobal {
  permissions: { querySync(query: PermissionQuery): { state: string } };
  version: { deno: string };
  listen(options: { hostname: string; port: number; transport: "tcp" }): DenoListener;
}
const deno = (globalThis as unknown as { Deno?: DenoGlobal }).Deno;
const bun = (globalThis as unknown as { Bun?: { version: string } }).Bun;
const node = process.versions.node;
export const RUNTIME = deno
  ? `deno/${deno.version.deno}`
  : bun
  ? `bun/${bun.version}`
  : `node/${node}`;

function mayRead(query: PermissionQuery): boolean {
  return !deno || deno.permissions.querySync(query).state === "granted";
}

function readEnv(variable: string): string | undefined {
  return mayRead({ name: "env", variable }) ? process.env[variable] : undefined;
}

// ---------------------------------------------------------------------------
// Reply table. Every byte smtp521 sends is built here, from the server's name
// and, for RCPT only, a recipient domain that passed `checkedDomain`.
// ---------------------------------------------------------------------------

/** The fixed replies for one server name, CRLF-terminated. */
function buildReplies(name: string) {
  const replies = {
    /** RFC 1846 §4.1 greeting, and the answer to every line in `greet` mode. */
    refuse: `521 ${name} does not accept mail\r\n`,
    /** RFC 5321 §4.1.1.10: QUIT. */
    closing: `221 ${name} closing connection\r\n`,
    /** `rcpt` mode greeting (RFC 1846 §3: a relay greets normally). */
    ready: `220 ${name} ESMTP refuses all mail\r\n`,
    /** HELO/EHLO: one line, so no extension (PIPELINING, STARTTLS, AUTH) is offered. */
    hello: `250 ${name}\r\n`,
    ok: "250 OK\r\n",
    /** RFC 5321 §3.6.2: a recipient outside `--domains`; never an open relay. */
    relayDenied: "550 relaying denied\r\n",
    /** RFC 5321 §3.3: DATA when every RCPT was refused. No reply is ever 354. */
    noRecipients: "554 no valid recipients\r\n",
    badSequence: "503 bad sequence of commands\r\n",
    badSyntax: "501 syntax error in parameters or arguments\r\n",
    notImplemented: "502 command not implemented\r\n",
    unknownCommand: "500 command not recognized\r\n",
    /** RFC 5321 §4.5.3.1.6: a text line over 1000 octets, in `rcpt` mode. */
    lineTooLong: "500 line too long\r\n",
  };
  return Object.freeze(replies);
}
export type Replies = ReturnType<typeof buildReplies>;

/** RFC 1846 §3, RFC 7504 §3: the RCPT refusal naming the recipient's domain. */
function rcptRefusal(code: RcptCode, domain: string): string {
  return `${code} ${domain} does not accept mail\r\n`;
}

const replyCache = new Map<string, Replies>();

/**
 * The replies for a server name, remembered for at most 64 names: a server has
 * one, or one per local address, and whoever reaches many local addresses
 * (127.0.0.0/8, a routed IPv6 prefix) must not grow this without bound.
 */
export function repliesFor(name: string): Replies {
  let replies = replyCache.get(name);
  if (!replies) {
    if (replyCache.size >= 64) replyCache.clear();
    replyCache.set(name, replies = buildReplies(name));
  }
  return replies;
}

// ---------------------------------------------------------------------------
// Names. A reply may only ever name a checked domain or address literal.
// ---------------------------------------------------------------------------

/** RFC 5321 §4.1.2 Domain: LDH labels of 1-63 octets (253 octets in all: checked apart). */
const LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
const DOMAIN = new RegExp(`^${LABEL}(?:\\.${LABEL})*$`, "i");

/**
 * A well-formed domain (lower-cased, one trailing dot dropped) or address
 * literal (RFC 5321 §4.1.3: `[192.0.2.1]`, `[IPv6:2001:db8::1]` with no zone id,
 * which isIPv6 would take with any text after its `%`); else null.
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

/**
 * What `--max-per-ip` counts: an IPv4 address, or the /64 of an IPv6 address
 * (RFC 4291 §2.5.4: one host, or one customer, holds a whole /64).
 */
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

/**
 * `--domains a.example,.b.example`: a name, or with a leading dot every name
 * under it but not itself (as in Postfix tables).
 */
export type DomainList = {
  readonly names: ReadonlySet<string>;
  readonly parents: ReadonlySet<string>;
};

/** The list, or the first entry that is not a domain, `.domain` or address literal. */
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
/** Why a session ended, as logged (README "Logs and signals"). */
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
  /** The name in replies, already checked. */
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
  /** Complete lines taken in (each restarts the idle time-out). */
  readonly lines: number;
  /** Set once: send, then close (lingering) for this reason. */
  readonly end: EndReason | null;
}

/** One session's state: a plain object, changed only by `receive`. */
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
  over: boolean;
  /** `rcpt` mode: a MAIL that no RSET or HELO/EHLO has ended (RFC 5321 §4.1.4). */
  inTransaction: boolean;
}

/** RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. */
export const MAX_LINE = 1000;
/** RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its punctuation. */
const MAX_PATH = 256;
const [TAB, LF, CR, SPACE, TLS_HANDSHAKE] = [0x09, 0x0a, 0x0d, 0x20, 0x16];
/** A cross-protocol probe: an HTTP request line is never SMTP. */
const HTTP_REQUEST =
  /^(?:(?:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH)(?: |$)|[A-Z]+ \S+ HTTP\/\d)/;
const NOTHING: Step = Object.freeze({ send: "", lines: 0, end: null });

type Answer = readonly [reply: string, end: EndReason | null];

export function createSession(config: SessionConfig): Session {
  if (config.mode === "rcpt") return newSession(config, "ready", null);
  return newSession(config, "refuse", config.mode === "close" ? "closed" : null);
}

/** A connection over a limit still hears the 521, then a close: never a 4xx, never silence. */
export function overloadSession(config: SessionConfig): Session {
  return newSession(config, "refuse", "overload");
}

function newSession(
  config: SessionConfig,
  first: "ready" | "refuse",
  end: EndReason | null,
): Session {
  const replies = repliesFor(config.name);
  const greeting = { send: replies[first], lines: 0, end };
  return {
    config,
    replies,
    greeting,
    partial: null,
    received: 0,
    over: end !== null,
    inTransaction: false,
  };
}

/** Feed received bytes; bytes after the end are ignored. */
export function receive(session: Session, chunk: Uint8Array): Step {
  if (session.over || chunk.length === 0) return NOTHING;
  if (session.received === 0 && session.partial === null && chunk[0] === TLS_HANDSHAKE) {
    return finish(session, "", 0, "forbidden");
  }
  const bytes = Buffer.isBuffer(chunk)
    ? chunk
    : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
  let send = "";
  let lines = 0;
  let start = 0;
  for (let lf = bytes.indexOf(LF); lf >= 0; lf = bytes.indexOf(LF, start)) {
    const partial = session.partial;
    if ((partial?.length ?? 0) + lf - start + 1 > MAX_LINE) {
      return finish(session, send + tooLong(session), lines, "too-long");
    }
    const line = partial
      ? lineText(
        Buffer.concat([partial, bytes.subarray(start, lf)]),
        0,
        partial.length + lf - start,
      )
      : lineText(bytes, start, lf);
    session.partial = null;
    start = lf + 1;
    lines++;
    if (++session.received === 1 && HTTP_REQUEST.test(line)) {
      return finish(session, send, lines, "forbidden");
    }
    const [reply, end] = session.config.mode === "rcpt"
      ? rcptAnswer(session, line)
      : greetAnswer(session, line);
    send += reply;
    if (end) return finish(session, send, lines, end);
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

/**
 * The line in `bytes` from `start` to its LF at `lf`, without one CR and then
 * without trailing blanks (no command needs them), trimmed by a loop over the
 * bytes: a pattern such as /[ \t]+$/ costs the square of a run of blanks.
 */
function lineText(bytes: Buffer, start: number, lf: number): string {
  let end = lf > start && bytes[lf - 1] === CR ? lf - 1 : lf;
  while (end > start && (bytes[end - 1] === SPACE || bytes[end - 1] === TAB)) end--;
  return bytes.toString("latin1", start, end);
}

function finish(session: Session, send: string, lines: number, end: EndReason): Step {
  session.over = true;
  session.partial = null;
  return { send, lines, end };
}

function tooLong({ config, replies }: Session): string {
  return config.mode === "rcpt" ? replies.lineTooLong : replies.refuse;
}

/** RFC 1846 §4.2 b: every line gets the 521, except QUIT (RFC 7504 §3). */
function greetAnswer({ replies }: Session, line: string): Answer {
  return /^quit$/i.test(line) ? [replies.closing, "quit"] : [replies.refuse, null];
}

/** SMTP verbs smtp521 knows but will not run (RFC 5321 §4.2.4: 502). */
const NOT_IMPLEMENTED = new Set(
  [
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
  ],
);
const VERB = /^[A-Za-z]{1,8}$/;
// Arguments are read by search, not by one pattern: a pattern that fails late
// backtracks over the whole line.
const NOT_IN_PATH = /[^\x21-\x3b\x3d\x3f-\x7e]/;

/**
 * RFC 5321 §4.1.1.2-3: `FROM:<path>` or `TO:<path>` (one space allowed before
 * `<`, as many clients send it), then optional ESMTP parameters; the path, or null.
 */
function pathArgument(args: string, keyword: "FROM:" | "TO:"): string | null {
  if (args.slice(0, keyword.length).toUpperCase() !== keyword) return null;
  const open = args.charCodeAt(keyword.length) === SPACE ? keyword.length + 1 : keyword.length;
  const close = args.indexOf(">", open);
  if (args[open] !== "<" || close < 0 || close - open + 1 > MAX_PATH) return null;
  // ESMTP parameters must follow a space; no extension is offered, so none is read or echoed.
  const badParameters = close + 1 < args.length && args[close + 1] !== " ";
  const path = args.slice(open + 1, close);
  return badParameters || NOT_IN_PATH.test(path) ? null : path;
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
  if (!config.domains) return rcptRefusal(config.rcptCode, domain ?? config.name);
  if (!domain || !listed(config.domains, domain)) return replies.relayDenied;
  return rcptRefusal(config.rcptCode, domain);
}

// ---------------------------------------------------------------------------
// Transports: thin adapters that own sockets, timers and limits, and send
// only what the session core returns.
// ---------------------------------------------------------------------------

// --- Limits ------------------------------------------------------------------

/** The defaults of `serve`, and so of the flags that set them (`FLAGS`, README "Flags"). */
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

/**
 * Lines per session by mode. A relay must take 100 recipients in one
 * transaction (RFC 5321 §4.5.3.1.8), so `rcpt` mode allows EHLO, MAIL, 100
 * RCPT, DATA, QUIT and room to spare: every recipient is refused in one session.
 */
export const MAX_COMMANDS: Readonly<Record<Mode, number>> = { greet: 20, close: 20, rcpt: 120 };

/** After the last reply, read and discard this long, then destroy (a lingering close). */
const LINGER_MS = 2000;
/** ...but read no more than this: what a flood sends past it waits in the kernel. */
const LINGER_BYTES = 64 * 1024;

/**
 * Every session's deadline on one interval timer, not a timer each (a timer
 * costs memory per connection). It stops at the first sweep that finds no
 * session open (not at each close: sessions one after another would start and
 * stop it every time), so a finished stdio session lets the process exit. The
 * open sessions are an array with swap-remove: a Set rehashing under churn kept
 * finished sockets alive through V8 scavenges (bench/HISTORY.md).
 */
function deadlines(idleMs: number, maxDurationMs: number) {
  const periodMs = Math.max(20, Math.min(idleMs, maxDurationMs, LINGER_MS) / 10);
  const open: Conversation[] = [];
  let timer: ReturnType<typeof setInterval> | undefined;
  const sweep = () => {
    const now = Date.now();
    // Backwards: a stopped session may leave at once, moving the last one into its slot.
    for (let i = open.length - 1; i >= 0; i--) if (open[i]?.at <= now) stop(open[i], "timeout");
    if (open.length === 0) timer = void clearInterval(timer);
  };
  return {
    add(conversation: Conversation) {
      conversation.slot = open.push(conversation) - 1;
      timer ??= setInterval(sweep, periodMs);
    },
    remove(conversation: Conversation) {
      const last = open.pop()!;
      if (last !== conversation) open[last.slot = conversation.slot] = last;
    },
    /** RFC 5321 §4.5.3.2.7: the idle time-out restarts with each line, never past the life. */
    restart(conversation: Conversation) {
      conversation.at = Math.min(Date.now() + idleMs, conversation.started + maxDurationMs);
    },
    /** Close every open session now, for this reason. */
    stopAll: (reason: EndReason) => [...open].forEach((conversation) => stop(conversation, reason)),
    /** Stop the timer now, not at its next sweep, if no session is open (a server closing). */
    release: () => open.length === 0 && (timer = void clearInterval(timer)),
  };
}
type Deadlines = ReturnType<typeof deadlines>;

// --- One conversation --------------------------------------------------------

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

/** A session on its conduit, as the transport and the deadlines see it. */
interface Conversation {
  readonly conduit: Conduit;
  readonly session: Session;
  readonly started: number;
  /** When the deadlines act: the idle or whole-life deadline, then the end of the linger. */
  at: number;
  /** The place in the deadlines' list. */
  slot: number;
  /** Set once the last reply is out: the conversation lingers, then ends for this reason. */
  end: EndReason | null;
  /** Bytes read and discarded while lingering. */
  discarded: number;
}

/**
 * Run one session over a conduit: send what the core returns, pause reading
 * while the peer does not read, keep the deadlines, close lingering, and call
 * `ended` once the conduit has closed.
 */
function converse(
  conduit: Conduit,
  session: Session,
  clock: Deadlines,
  ended: (conversation: Conversation) => void,
) {
  const conversation: Conversation = {
    conduit,
    session,
    started: Date.now(),
    at: 0,
    slot: -1,
    end: null,
    discarded: 0,
  };
  clock.restart(conversation);
  clock.add(conversation);
  conduit.on("data", (chunk) => {
    if (conversation.end === null) perform(conversation, receive(session, chunk), clock);
    else if ((conversation.discarded += chunk.length) > LINGER_BYTES) conduit.pause();
  });
  // A TCP socket ends its own side when the client's FIN comes, then closes;
  // stdin and stdout joined, and Deno's connection, must be told.
  if (!(conduit instanceof Socket)) conduit.on("end", () => linger(conversation, "client-closed"));
  conduit.on("error", () => stop(conversation, "reset"));
  conduit.on("close", () => {
    clock.remove(conversation);
    conversation.end ??= "client-closed"; // no reason by now: the client's FIN ended it
    ended(conversation);
  });
  perform(conversation, session.greeting, clock);
}

function perform(conversation: Conversation, step: Step, clock: Deadlines): void {
  const { conduit } = conversation;
  if (step.send && !conduit.write(step.send) && !step.end) {
    conduit.pause(); // a pipelining peer that does not read is not read either
    conduit.once("drain", () => conduit.resume());
  }
  if (step.end) linger(conversation, step.end);
  else if (step.lines) clock.restart(conversation);
}

/**
 * Send the last reply and a FIN, then read and discard for LINGER_MS before
 * destroying, so a client still sending gets the reply, not a reset that eats it.
 */
function linger(conversation: Conversation, reason: EndReason): void {
  if (conversation.end) return;
  conversation.end = reason;
  conversation.conduit.end();
  // A reader paused for a peer that did not read resumes, to discard its late bytes.
  if (conversation.conduit.isPaused()) conversation.conduit.resume();
  conversation.at = Date.now() + LINGER_MS;
}

/** Destroy now; a lingering conversation keeps the reason it already has. */
function stop(conversation: Conversation, reason: EndReason): void {
  conversation.end ??= reason;
  conversation.conduit.destroy();
}

// --- Listeners ---------------------------------------------------------------

/** Where to listen: an address and port ("" = every address), or an inherited socket. */
export type ListenAddress = { readonly host: string; readonly port: number } | {
  readonly fd: number;
};

/** A connection: its byte stream, and its two ends where the runtime knows them. */
type Connection =
  & Conduit
  & Partial<Pick<Socket, "remoteAddress" | "remotePort" | "localAddress" | "localPort">>;

/** A bound listener, over node:net or Deno's own API. */
interface Listener {
  readonly address: AddressInfo;
  /** Hand each accepted connection to `accepted`; trouble accepting goes to `failed`. */
  start(
    accepted: (connection: Connection) => void,
    failed: (error: NodeJS.ErrnoException) => void,
  ): void;
  close(): void;
}

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

/**
 * Deno's own listener. Deno's node:net listener stops accepting for good after
 * one EMFILE and loses the greeting of a client that half-closes at once;
 * `Deno.listen` reports EMFILE and goes on once descriptors free up.
 */
function bindDeno({ host, port }: { host: string; port: number }): Listener {
  const listener = deno!.listen({ hostname: host, port, transport: "tcp" });
  const { hostname } = listener.addr;
  let open = true;
  return {
    address: {
      address: hostname,
      family: hostname.includes(":") ? "IPv6" : "IPv4",
      port: listener.addr.port,
    },
    async start(accepted, failed) {
      while (open) {
        const conn = await listener.accept().catch((error) => error as NodeJS.ErrnoException);
        if (!(conn instanceof Error)) accepted(denoConnection(conn));
        else if (open) {
          failed(conn);
          await sleep(100); // out of descriptors: try again once some may be free
        }
      }
    },
    close() {
      open = false;
      listener.close();
    },
  };
}

/** Deno: read a line's worth at once (MAX_LINE); a held connection holds this buffer. */
const DENO_READ_BYTES = 1024;
/** Deno: past this many bytes not yet written, `write` says "wait for drain", as node:net does. */
const DENO_HIGH_WATER = 64 * 1024;

/**
 * A Deno connection as a Conduit: node:net's events over Deno's promises. One
 * listener per event is all `converse` sets, so they are kept in a plain object.
 */
function denoConnection(conn: DenoConn): Connection {
  const on: Record<string, ((chunk?: Uint8Array) => void) | undefined> = {};
  let writes: Promise<void> | null = null; // the writes in flight, in order
  let queued = 0;
  let paused = false;
  let wake: (() => void) | null = null;
  let [gone, ourEnd, theirEnd] = [false, false, false]; // destroyed; our side ended; the client's
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
  /** Run `next` after the writes in flight, in order. */
  const then = (next: () => Promise<unknown>) => {
    const done = () => {
      if (writes === chained) writes = null;
    };
    const chained: Promise<void> = (writes ? writes.then(next) : next()).then(done, failed);
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
  const connection = {
    remoteAddress: conn.remoteAddr.hostname,
    remotePort: conn.remoteAddr.port,
    localAddress: conn.localAddr.hostname,
    on(event: string, listener: (chunk?: Uint8Array) => void) {
      on[event] = listener;
    },
    once(_drain: "drain", listener: () => void) {
      on.drain = () => {
        on.drain = undefined;
        listener();
      };
    },
    write,
    end(last?: string, done?: () => void) {
      if (last) write(last);
      ourEnd = true;
      then(() => conn.closeWrite().then(done));
      closeIfDone();
    },
    destroy,
    pause: () => void (paused = true),
    resume() {
      paused = false;
      wake?.();
    },
    isPaused: () => paused,
  };
  (async () => {
    const buffer = new Uint8Array(DENO_READ_BYTES);
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
  return connection as Connection;
}

function bind(where: ListenAddress): Promise<Listener> {
  if (!deno || "fd" in where) return bindNode(where);
  return new Promise((resolve) => resolve(bindDeno(where))); // a failure to bind rejects
}

/** "Every address" is `::` (IPv4 too), or `0.0.0.0` where IPv6 is absent. */
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

/** Structured log: an event, its fields, and when it happened if not now (ms since the epoch). */
export type Log = (
  event: string,
  fields: Readonly<Record<string, string | number>>,
  at?: number,
) => void;

/** The options of `serve`; `DEFAULTS` has the defaults (the flags of the same names set them). */
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

export interface Smtp521Server {
  /** The bound addresses, with their actual ports. */
  readonly addresses: readonly AddressInfo[];
  /** Where the name in replies came from: `--hostname`, `system`, or `local-address`. */
  readonly name: { readonly value: string; readonly source: string };
  /** Open session sockets, lingering ones included. */
  connections(): number;
  /** Stop accepting, let sessions end for `drainMs`, close the rest; sessions by end reason. */
  close(drainMs?: number): Promise<Record<string, number>>;
}

/** The name in replies: the flag, else a fully qualified system name; null: local addresses. */
function fixedName(hostname: string | undefined): { value: string; source: string } | null {
  if (hostname) return { value: hostname, source: "--hostname" };
  const system = systemName();
  return system?.includes(".") ? { value: system, source: "system" } : null;
}

/** The options with every default filled in, and the session config for a name. */
function settle<T extends ServeOptions>(options: T) {
  const settings = { ...DEFAULTS, ...options };
  const { mode, rcptCode, domains } = settings;
  const maxCommands = options.maxCommands ?? MAX_COMMANDS[mode];
  const config = (name: string): SessionConfig => ({ mode, name, maxCommands, rcptCode, domains });
  return { ...settings, config };
}

/** The one line of a finished session, over TCP and stdio alike (README "Logs and signals"). */
function logSession(
  { log, mode }: { log: Log; mode: Mode },
  remote: string,
  localPort: number | string,
  end: EndReason,
  started = Date.now(),
  lines = 0,
): void {
  const at = Date.now();
  log(
    "session",
    { remote, local_port: localPort, mode, duration_ms: at - started, lines, end },
    at,
  );
}

/** Serve smtp521 on TCP until `close()`. Rejects if any address cannot be bound. */
export async function serve(options: ServeOptions = {}): Promise<Smtp521Server> {
  const settings = settle(options);
  const name = fixedName(settings.hostname);
  const fixedConfig = name && settings.config(name.value);
  const perNetwork = new Map<string, number>();
  const clock = deadlines(settings.timeoutMs, settings.maxDurationMs);
  const endings: Record<string, number> = {};
  const room = descriptorRoom();
  let [open, overloaded, lastWarning] = [0, 0, 0];

  /** Count a finished session, and log it. */
  function record(
    remote: string,
    localPort: number,
    end: EndReason,
    started?: number,
    lines?: number,
  ) {
    endings[end] = (endings[end] ?? 0) + 1;
    logSession(settings, remote, localPort, end, started, lines);
  }

  /** A connection on a listener bound to `localIp` (if not a wildcard) and `localPort`. */
  function accept(connection: Connection, localIp: string | undefined, localPort: number) {
    const ip = connection.remoteAddress ? plainAddress(connection.remoteAddress) : "";
    const local = localIp ?? connection.localAddress;
    const remote = ip ? hostPort(ip, connection.remotePort ?? 0) : "-";
    if (!ip || !local) { // reset while it waited to be accepted
      connection.destroy();
      return record(remote, localPort, "reset");
    }
    const config = fixedConfig || settings.config(addressLiteral(local));
    const network = clientNetwork(ip);
    const fromNetwork = perNetwork.get(network) ?? 0;
    const over = open >= settings.maxConnections || fromNetwork >= settings.maxPerIp;
    if (open + overloaded >= room) {
      warn("EMFILE", `near the descriptor limit: ${open + overloaded} sockets open`);
    }
    if ((over && overloaded >= settings.maxConnections) || open + overloaded >= room) {
      // Even the lingering of refusals is bounded; past it, greet and drop.
      connection.on("error", () => {});
      connection.end(overloadSession(config).greeting.send, () => connection.destroy());
      return record(remote, localPort, "overload");
    }
    if (over) overloaded++;
    else {
      open++;
      perNetwork.set(network, fromNetwork + 1);
    }
    converse(
      connection,
      (over ? overloadSession : createSession)(config),
      clock,
      (conversation) => {
        if (over) overloaded--;
        else {
          open--;
          const left = perNetwork.get(network)! - 1;
          if (left) perNetwork.set(network, left);
          else perNetwork.delete(network);
        }
        const { end, started, session } = conversation;
        record(remote, localPort, end!, started, session.received);
      },
    );
  }

  /** Trouble accepting (out of descriptors) is logged at most once a second. */
  function warn(error: string, detail: string) {
    if (Date.now() - lastWarning < 1000) return;
    lastWarning = Date.now();
    settings.log("error", { error, detail });
  }

  const listeners: Listener[] = [];
  try {
    for (const where of settings.listen) listeners.push(await bindAll(where));
  } catch (error) {
    for (const listener of listeners) listener.close();
    throw Object.assign(error as Error, {
      listen: describeListen(settings.listen[listeners.length]),
    });
  }
  for (const { address, start } of listeners) {
    // The listener's own address and port stand for the socket's, saving a getsockname each.
    const localIp = ["::", "0.0.0.0", ""].includes(address.address) ? undefined : address.address;
    start((connection) => accept(connection, localIp, address.port), (error) => {
      warn(error.code ?? "accept", error.message);
    });
  }

  async function close(drainMs = 5000): Promise<Record<string, number>> {
    for (const listener of listeners) listener.close();
    const deadline = Date.now() + drainMs;
    while (open + overloaded > 0 && Date.now() < deadline) await sleep(50);
    clock.stopAll("shutdown");
    while (open + overloaded > 0) await sleep(10);
    clock.release();
    return endings;
  }

  return {
    addresses: listeners.map((listener) => listener.address),
    name: name ?? { value: "[local address of each connection]", source: "local-address" },
    connections: () => open + overloaded,
    close,
  };
}

/** Descriptors the runtime itself holds (event loop, stdio, workers): about 25 measured. */
const RESERVED_DESCRIPTORS = 32;

/**
 * How many sockets fit under the descriptor limit (Linux, where it may be
 * read). Staying under it keeps Node's and Bun's accept loops off EMFILE,
 * which they absorb silently.
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

// --- Stdio -------------------------------------------------------------------

export type StdioOptions = Omit<ServeOptions, "listen" | "maxConnections" | "maxPerIp">;

/**
 * `--stdio`: one session on standard input and output, as inetd, xinetd,
 * systemd `Accept=yes`, tcpserver and socat run it. Resolves with the end
 * reason once the session is over and its replies are flushed.
 */
export function serveStdio(
  options: StdioOptions = {},
): { done: Promise<EndReason>; stop(reason: EndReason): void } {
  const settings = settle(options);
  const conduit = stdioConduit();
  // The socket's own addresses where it has them; else tcpserver's and systemd's variables.
  const ip = conduit.remoteAddress ?? readEnv("TCPREMOTEIP") ?? readEnv("REMOTE_ADDR") ??
    readEnv("REMOTE_HOST");
  const port = conduit.remotePort ?? readEnv("TCPREMOTEPORT") ?? readEnv("REMOTE_PORT") ?? "-";
  const localPort = conduit.localPort ?? readEnv("TCPLOCALPORT") ?? "-";
  const remote = ip ? hostPort(plainAddress(ip), port) : "-";
  const name = stdioName(settings.hostname, conduit.localAddress, settings.log);
  const clock = deadlines(settings.timeoutMs, settings.maxDurationMs);
  const done = new Promise<EndReason>((resolve) => {
    converse(conduit, createSession(settings.config(name)), clock, ({ end, started, session }) => {
      logSession(settings, remote, localPort, end!, started, session.received);
      resolve(end!);
    });
  });
  return { done, stop: clock.stopAll };
}

/**
 * Stdin and stdout as one conduit. Where they are one socket (inetd, systemd
 * `Accept=yes`, socat), its addresses name the ends, and on Node the session
 * runs over that socket, for a real half-close. Bun cannot open descriptor 0
 * as a socket, and Deno's node:net socket loses the greeting of a client that
 * half-closes at once: there the session runs over stdin and stdout joined.
 */
function stdioConduit(): Connection {
  const [input, output] = [fstatSync(0), fstatSync(1)];
  const oneSocket = input.isSocket() && input.dev === output.dev && input.ino === output.ino;
  if (oneSocket && !bun && !deno) return new Socket({ fd: 0, readable: true, writable: true });
  const joined = Duplex.from({ readable: process.stdin, writable: process.stdout });
  if (!oneSocket || bun) return joined;
  const { localAddress, localPort, remoteAddress, remotePort } = new Socket({
    fd: 0,
    readable: false,
  });
  return Object.assign(joined, { localAddress, localPort, remoteAddress, remotePort });
}

/** The name for a stdio session, from the best source the runtime allows (README "Deploying"). */
function stdioName(
  hostname: string | undefined,
  localAddress: string | undefined,
  log: Log,
): string {
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
// Options: the flags parseArgs takes, with `DEFAULTS` as their defaults; --help
// and README "Flags" say the same (the tests hold them to it). A bad flag or
// value is one line naming it, and exit 2.
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

/** A configuration error: names the flag and the fix (exit 2). */
export type UsageError = { readonly error: string };

const isError = (value: unknown): value is UsageError =>
  typeof value === "object" && value !== null && "error" in value;

function choice<T extends string>(
  flag: string,
  value: string,
  allowed: readonly T[],
): T | UsageError {
  if ((allowed as readonly string[]).includes(value)) return value as T;
  return { error: `--${flag}: "${value}" is not one of ${allowed.join(", ")}` };
}

function count(flag: string, value: string, min: number, max: number): number | UsageError {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  if (n >= min && n <= max) return n;
  return { error: `--${flag}: "${value}" must be a whole number from ${min} to ${max}` };
}

function seconds(flag: string, value: string): number | UsageError {
  const n = /^\d+(\.\d+)?$/.test(value) ? Number(value) : NaN;
  if (n >= 0.1 && n <= 86_400) return Math.round(n * 1000);
  return { error: `--${flag}: "${value}" must be seconds from 0.1 to 86400` };
}

/** `ADDR:PORT`, `[IPv6]:PORT`, `:PORT` or `fd:N`. */
function listenAddress(value: string): ListenAddress | UsageError {
  const fd = /^fd:(\d+)$/.exec(value);
  if (fd) return { fd: Number(fd[1]) };
  const parts = /^(?:\[([0-9a-fA-F:.]+)\]|(\d+\.\d+\.\d+\.\d+))?:(\d+)$/.exec(value);
  const host = parts?.[1] ?? parts?.[2] ?? "";
  const port = Number(parts?.[3]);
  if (parts && (!host || isIP(host)) && port <= 65535) return { host, port };
  return {
    error: `--listen: "${value}" is not ADDR:PORT, [IPv6]:PORT, :PORT or fd:N (e.g. 192.0.2.1:25)`,
  };
}

type FlagValues = ReturnType<typeof parseArgs<{ options: typeof FLAGS; strict: true }>>["values"];

/** Parse the server's flags. */
export function parseOptions(args: readonly string[]): Options | UsageError {
  let values: FlagValues;
  try {
    values = parseArgs({ args: [...args], options: FLAGS, strict: true }).values;
  } catch (error) {
    const flag = /'([^' ]+)/.exec((error as Error).message)?.[1] ?? String(args[0]);
    const code = (error as NodeJS.ErrnoException).code;
    const why = code === "ERR_PARSE_ARGS_UNKNOWN_OPTION"
      ? "unknown flag"
      : code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL"
      ? "unexpected argument"
      : "needs a value";
    return { error: `${flag}: ${why}; see --help` };
  }
  const mode = choice("mode", values.mode, ["greet", "close", "rcpt"] as const);
  const logFormat = choice("log", values.log, ["text", "json", "off"] as const);
  const rcptCode = choice("rcpt-code", values["rcpt-code"], ["521", "556"] as const);
  const given = values["max-commands"];
  const maxCommands = given === undefined
    ? MAX_COMMANDS[mode as Mode] ?? MAX_COMMANDS.greet
    : count("max-commands", given, 1, 1000);
  const maxConnections = count("max-connections", values["max-connections"], 1, 1_000_000);
  const maxPerIp = count("max-per-ip", values["max-per-ip"], 1, 1_000_000);
  const timeoutMs = seconds("timeout", values.timeout);
  const maxDurationMs = seconds("max-duration", values["max-duration"]);
  const drainMs = seconds("drain", values.drain);
  const { hostname, domains, user, port } = values;
  const listen = (port !== undefined ? [`:${port}`] : values.listen ?? [":25"]).map(listenAddress);
  const domainList = domains === undefined ? null : parseDomainList(domains);
  const checked: unknown[] = [mode, logFormat, rcptCode, maxCommands, maxConnections, maxPerIp];
  const problem = [...checked, timeoutMs, maxDurationMs, drainMs, ...listen].find(isError) ??
    misuse();
  if (problem) return problem;
  return {
    mode: mode as Mode,
    hostname: hostname === undefined ? undefined : checkedDomain(hostname)!,
    listen: listen as ListenAddress[],
    stdio: values.stdio,
    domains: domainList as DomainList | null,
    rcptCode: Number(rcptCode) as RcptCode,
    maxCommands: maxCommands as number,
    maxConnections: maxConnections as number,
    maxPerIp: maxPerIp as number,
    timeoutMs: timeoutMs as number,
    maxDurationMs: maxDurationMs as number,
    drainMs: drainMs as number,
    user,
    logFormat: logFormat as LogFormat,
    help: values.help,
    version: values.version,
  };

  /** A value that is well formed but wrong, or flags that do not go together. */
  function misuse(): UsageError | undefined {
    if (port !== undefined && values.listen) {
      return { error: "--port: give either --port or --listen, not both" };
    }
    if (hostname !== undefined && !checkedDomain(hostname)) {
      const example = "(e.g. ntp1.example.org or [192.0.2.1])";
      return {
        error: `--hostname: "${hostname}" is not a domain name or address literal ${example}`,
      };
    }
    if (typeof domainList === "string") {
      const what = "is not a domain, .domain or address literal list (e.g. a.example,.b.example)";
      return { error: `--domains: "${domainList}" ${what}` };
    }
    if (domainList && mode !== "rcpt") {
      return { error: "--domains: only rcpt mode reads recipients; add --mode rcpt" };
    }
    if (user !== undefined && !/^[^:]+(?::[^:]+)?$/.test(user)) {
      return {
        error: `--user: "${user}" is not NAME or NAME:GROUP (names or numeric ids, e.g. nobody)`,
      };
    }
    if (values.stdio && (values.listen || port !== undefined)) {
      return { error: "--stdio: serves one session on stdin/stdout; drop --listen and --port" };
    }
  }
}

// ---------------------------------------------------------------------------
// Logs: one line per event on standard error, never standard output (under
// --stdio that is the session).
// ---------------------------------------------------------------------------

/** A logfmt value that needs no quotes: printable ASCII without space, `"`, `=` or `\`. */
const BARE = /^[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+$/;

function logfmt(value: string | number): string {
  return typeof value === "number" || BARE.test(value) ? String(value) : JSON.stringify(value);
}

export function formatLine(
  format: "text" | "json",
  event: string,
  fields: Readonly<Record<string, string | number>>,
  at = Date.now(),
): string {
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
 * A log to standard error (or `sink`), one write at a time. The log is never
 * a way to stop the service: a sink that fails (EPIPE once the reader of a pipe
 * is gone, ENOSPC behind a redirect) or stalls costs dropped lines, counted,
 * never a crash or unbounded memory. The first write that gets through after
 * a loss says how many lines were lost; `dropped` counts them all, for the
 * stop line. `flush` waits for what it holds (call it before exit).
 */
export function createLog(format: LogFormat, sink: LogSink = writeStderr) {
  let [backlog, writing, unreported, dropped] = ["", false, 0, 0];
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
    const lines = backlog.split("\n").length - 1;
    const bytes = Buffer.from(notice + backlog);
    [backlog, writing] = ["", true];
    sink(bytes, (error) => {
      writing = false;
      if (error) lose(lines);
      else unreported -= reported;
      pump();
    });
  };
  const log: Log = (event, fields, at) => {
    if (format === "off") return;
    const line = formatLine(format, event, fields, at);
    if (backlog.length + line.length > LOG_BACKLOG) return lose(1);
    backlog += line;
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

/** Write all of `bytes` to standard error (a pipe may take part of them), then call back. */
function writeStderr(bytes: Uint8Array, done: (error: Error | null) => void): void {
  write(2, bytes, 0, bytes.length, null, (error, written) => {
    if (error || written === bytes.length) done(error);
    else writeStderr(bytes.subarray(written), done);
  });
}

// ---------------------------------------------------------------------------
// Main: a server, or one stdio session, until SIGTERM or SIGINT.
// ---------------------------------------------------------------------------

/** The fix for a listen failure, by cause. */
const LISTEN_FIXES: Record<string, string> = {
  EACCES:
    "ports below 1024 need root or CAP_NET_BIND_SERVICE (systemd AmbientCapabilities=, setcap), " +
    "or use a port above 1023",
  EADDRINUSE: "another server (an MTA?) holds that port: stop it, or choose another --listen",
  EADDRNOTAVAIL: "no interface has that address: check --listen",
  EBADF: "no socket was passed on that descriptor: start from a systemd .socket unit, " +
    "or use --listen ADDR:PORT",
  ENOTSOCK:
    "that descriptor is not a socket: start from a systemd .socket unit, or use --listen ADDR:PORT",
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
  const users = readFileSync("/etc/passwd", "latin1").split("\n").map((line) => line.split(":"));
  const entry = users.find((fields) => fields[typeof user === "string" ? 0 : 2] === String(user));
  return entry?.[3] ? Number(entry[3]) : undefined;
}

/** Text on stdout or (with the program's name) stderr, then the exit code, once it is written. */
function say(
  text: string,
  code: number,
  to: NodeJS.WritableStream = process.stderr,
): Promise<number> {
  const line = to === process.stderr ? `smtp521: ${text}\n` : text;
  return new Promise((resolve) => to.write(line, () => resolve(code)));
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
  process.stderr.on("error", () => {}); // a closed standard error is never fatal (the log counts)
  if (args[0] === "probe") {
    return await say(
      "probe: the probe is its own file: run probe.ts from a workstation " +
        "(e.g. deno run --allow-net probe.ts --domain ntp1.example.org)",
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
    const { code, message, listen = "-" } = error as NodeJS.ErrnoException & { listen?: string };
    const fix = LISTEN_FIXES[code ?? ""] ?? "check --listen";
    if (options.logFormat !== "json") {
      return await say(`cannot listen on ${listen}: ${code ?? message}; ${fix}`, 1);
    }
    log("error", { listen, error: code ?? message, fix });
    await flush();
    return 1;
  }
  let ids = {};
  try {
    if (options.user) ids = dropPrivileges(options.user);
  } catch (error) {
    await server.close(0);
    return await say(`--user: ${(error as Error).message}`, 1);
  }
  const listen = server.addresses.map((a) => hostPort(a.address, a.port)).join(",");
  const { value: name, source: name_source } = server.name;
  log("start", {
    version: VERSION,
    runtime: RUNTIME,
    mode: options.mode,
    name,
    name_source,
    listen,
    ...ids,
    pid: process.pid,
  });
  const signal = await signalled(() => server.close(0));
  const endings = await server.close(options.drainMs);
  const sessions = Object.values(endings).reduce((sum, n) => sum + n, 0);
  log("stop", { signal, sessions, ...endings, ...(dropped() ? { log_dropped: dropped() } : {}) });
  await flush();
  return 0;
}

if (import.meta.main) main(process.argv.slice(2)).then((code) => process.exit(code));
