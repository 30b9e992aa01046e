// Helpers for the tests: spawn the real smtp521.ts on a runtime, talk to it
// over a real socket, run a client program. Every connection goes to
// 127.0.0.1 or ::1 and every wait is bounded.

import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import {
  chmodSync,
  copyFileSync,
  linkSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
export const FILE = join(ROOT, "smtp521.ts");
export const BIN = join(ROOT, "node_modules", ".bin");

export const RUNTIMES = {
  node: [join(BIN, "node"), FILE],
  deno: [join(BIN, "deno"), "run", "--allow-net", "--no-prompt", FILE],
  bun: [join(BIN, "bun"), FILE],
} as const;
export type Runtime = keyof typeof RUNTIMES;

/** Whether `tool` is on PATH. */
export const has = (tool: string) => spawnSync("sh", ["-c", 'command -v "$0"', tool]).status === 0;
export const isRoot = process.getuid?.() === 0;

/**
 * A test that cannot run on this machine is reported as skipped, never as passed, and says
 * why in its name: `it.skipIf(why)(unless("does x", why), ...)`, where `why` is the reason or
 * "" when it can run. `.ci/run` fails on any skipped test whose reason it does not name.
 */
export const unless = (name: string, why: string) => (why ? `${name} [skipped: ${why}]` : name);

/** Resolve `promise`, or fail after `ms` saying what did not happen. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Wait until `condition()` holds, checking every 20 ms, for at most `ms`. */
export async function until(condition: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Whether a TCP socket listens on `port` (any address), from the kernel's own table. */
export function listening(port: number): boolean {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return ["/proc/net/tcp", "/proc/net/tcp6"].some((table) => {
    // "sl local_address rem_address st ...": st 0A is LISTEN.
    return readFileSync(table, "latin1").split("\n").some((row) => {
      const [, local, , state] = row.trim().split(/\s+/);
      return state === "0A" && local?.endsWith(`:${hex}`);
    });
  });
}

/**
 * Node 24 and smtp521.ts where any user may run them, for the tests that run smtp521 as
 * nobody: the checkout may live where nobody cannot reach it (a clone in a `mktemp -d`
 * directory, mode 0700, or a private home directory). A hard link of the runtime where the
 * file system allows it (the binary is 120 MB), else a copy; a copy of the file. `remove()`
 * deletes the directory.
 */
export function forAnyUser(): { node: string; file: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), "smtp521-any-user-"));
  chmodSync(dir, 0o755);
  const node = join(dir, "node");
  try {
    linkSync(realpathSync(RUNTIMES.node[0]), node);
  } catch {
    copyFileSync(realpathSync(RUNTIMES.node[0]), node); // another file system, or links not allowed
    chmodSync(node, 0o755);
  }
  const file = join(dir, "smtp521.ts");
  copyFileSync(FILE, file);
  chmodSync(file, 0o644);
  writeFileSync(join(dir, "package.json"), '{ "type": "module" }\n', { mode: 0o644 });
  return { node, file, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface Running {
  readonly child: ChildProcess;
  readonly port: number;
  /** Every stderr line so far. */
  readonly log: string[];
  /** Wait for a stderr line matching `pattern`. */
  waitFor(pattern: RegExp, ms?: number): Promise<string>;
  /** Send a signal and wait for the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  /** The exit code, once the process has exited. */
  readonly exited: Promise<number | null>;
}

/**
 * Spawn the real file with `--port 0` (unless listening elsewhere), under
 * `wrap` (e.g. systemd-socket-activate) if given, and read the port from its
 * start line.
 */
export async function start(
  runtime: Runtime,
  args: string[] = [],
  wrap: string[] = [],
): Promise<Running> {
  const listen = args.some((a) => a === "--listen" || a === "--port") ? [] : ["--port", "0"];
  const [command, ...rest] = [...wrap, ...RUNTIMES[runtime], ...listen, ...args];
  const child = spawn(command, rest, { stdio: ["ignore", "pipe", "pipe"] });
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
  // Deno starts in about 70 ms idle; 20 s is for a machine busy with other work.
  const startLine = await waitFor(/event=start |"event":"start"/, 20_000);
  const port = Number(/listen(?:=|":")[^\s",]*:(\d+)/.exec(startLine)![1]);
  return {
    child,
    port,
    log,
    waitFor,
    exited,
    stop: (signal = "SIGTERM") => {
      if (child.exitCode === null) child.kill(signal);
      return exited;
    },
  };
}

export interface Talk {
  /** Everything the server sent. */
  readonly text: string;
  /** How it ended: the server's FIN, a reset, or our own time-out. */
  readonly ending: "fin" | "reset" | "timeout";
  readonly ms: number;
}

/**
 * Connect, optionally wait for the greeting, write `send` (then half-close if
 * `halfClose`), and read until the server closes (bounded by `ms`).
 */
export function talk(
  port: number,
  send: string | Uint8Array = "",
  {
    host = "127.0.0.1",
    ms = 15_000, // a bound for a busy machine: every test expects the server to end the talk first
    afterGreeting = true,
    halfClose = false,
    localAddress = undefined as string | undefined,
  } = {},
): Promise<Talk> {
  return new Promise((resolve) => {
    const begun = Date.now();
    const socket = connect({ host, port, localAddress });
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
      if (halfClose) socket.end();
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

export const run = (
  command: string,
  args: string[],
  options: { input?: string; timeout?: number } = {},
) =>
  new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = execFile(
      command,
      args,
      { timeout: options.timeout ?? 20_000 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
        resolve({ code, stdout, stderr });
      },
    );
    child.stdin!.end(options.input ?? "");
  });

export const greeting = (name: string) => `521 ${name} does not accept mail\r\n`;
