// Helpers for the tests: spawn the real smtp521.ts on a runtime, talk to it
// over a real socket, run a client program. Every connection goes to
// 127.0.0.1 or ::1 and every wait is bounded.

import { type ChildProcess, execFile, spawn } from "node:child_process";
import { connect } from "node:net";
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
export async function start(runtime: Runtime, args: string[] = [], wrap: string[] = []): Promise<Running> {
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
  const startLine = await waitFor(/event=start |"event":"start"/);
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
    ms = 5000,
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

export const run = (command: string, args: string[], options: { input?: string; timeout?: number } = {}) =>
  new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = execFile(command, args, { timeout: options.timeout ?? 20_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
      resolve({ code, stdout, stderr });
    });
    child.stdin!.end(options.input ?? "");
  });

export const greeting = (name: string) => `521 ${name} does not accept mail\r\n`;
