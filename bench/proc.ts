// Processes for the benchmark: starting a server on a runtime with its stderr
// in a file, reading its port from the start line, stopping it, and reading
// its memory and CPU from /proc (Linux).

import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
export const BIN = join(ROOT, "node_modules", ".bin");
export const NAME = "bench.example";

export const RUNTIMES = ["node", "deno", "bun"] as const;
export type Runtime = (typeof RUNTIMES)[number];

/**
 * The servers measured: the product, the node:net baseline, the same baseline
 * again in a process of its own (the control: how far a ratio moves when
 * nothing differs), the baseline plus only the per-session work SPEC asks
 * (the floor), and the two native bare responders.
 */
export const IMPLS = ["baseline", "smtp521", "control", "floor", "deno-listen", "bun-listen"] as const;
export type Impl = (typeof IMPLS)[number];

export const FILES: Record<Impl, string> = {
  baseline: join(ROOT, "bench", "baseline.ts"),
  smtp521: join(ROOT, "smtp521.ts"),
  control: join(ROOT, "bench", "baseline.ts"),
  floor: join(ROOT, "bench", "floor.ts"),
  "deno-listen": join(ROOT, "bench", "deno-listen.ts"),
  "bun-listen": join(ROOT, "bench", "bun-listen.ts"),
};

/** How each runtime runs a .ts file; Deno with the product's only permission, and never a prompt. */
export function command(runtime: Runtime): [string, ...string[]] {
  if (runtime === "deno") return [join(BIN, "deno"), "run", "--allow-net", "--no-prompt"];
  return [join(BIN, runtime)];
}

/** The product as it runs in production (`greet` mode, text logs), with limits out of the load's way. */
export function serverArgs(impl: Impl, timeoutS?: number): string[] {
  const common = ["--listen", "127.0.0.1:0", "--hostname", NAME];
  if (impl !== "smtp521") return common;
  const timeout = timeoutS === undefined ? [] : ["--timeout", String(timeoutS)];
  return [...common, "--max-per-ip", "100000", "--max-connections", "100000", ...timeout];
}

export interface Server {
  readonly pid: number;
  readonly port: number;
  /** The start line: runtime and version as the server saw them. */
  readonly startLine: string;
  stop(): Promise<void>;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Whether `promise` settles within `ms`; the timer is cleared either way, so it keeps nothing alive. */
export async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([promise.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Start `file` as `impl` with stderr in `logFile` and wait (at most 15 s) for its start line. */
export async function startServer(
  runtime: Runtime,
  impl: Impl,
  logFile: string,
  timeoutS?: number,
  file = FILES[impl],
): Promise<Server> {
  const [program, ...pre] = command(runtime);
  const log = openSync(logFile, "w");
  const child = spawn(program, [...pre, file, ...serverArgs(impl, timeoutS)], {
    cwd: ROOT,
    stdio: ["ignore", "ignore", log],
  });
  closeSync(log);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const startLine = await waitForStart(child, logFile);
  const port = Number(/ listen=\S*:(\d+)/.exec(startLine)![1]);
  const stop = async () => {
    child.kill("SIGTERM"); // smtp521 drains for up to 5 s; nothing is open by now
    if (await within(exited, 8000)) return;
    child.kill("SIGKILL");
    await exited;
  };
  return { pid: child.pid!, port, startLine, stop };
}

async function waitForStart(child: ChildProcess, logFile: string): Promise<string> {
  for (let waited = 0; waited < 15_000; waited += 20) {
    const line = readFileSync(logFile, "utf8").split("\n").find((l) => / event=start .* listen=/.test(l));
    if (line) return line;
    if (child.exitCode !== null) break;
    await sleep(20);
  }
  child.kill("SIGKILL");
  throw new Error(`no start line from ${child.spawnargs.join(" ")}:\n${readFileSync(logFile, "utf8")}`);
}

/** Resident set size in bytes (VmRSS). */
export function rss(pid: number): number {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "latin1"))![1]) * 1024;
}

/** User plus system CPU seconds of a process so far, all threads (utime and stime in /proc/PID/stat). */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // the name may hold spaces
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
}
/** USER_HZ: 100 on every Linux this runs on (getconf CLK_TCK). */
const CLOCK_TICKS = 100;

/**
 * Busy CPU seconds of the whole machine so far: every state in /proc/stat
 * but idle and iowait. Loopback TCP work shows up here as softirq; measured
 * here, a process's utime + stime includes its share of that, so the busy
 * time minus our processes' time is what other programs used.
 */
export function machineBusySeconds(): number {
  const [user, nice, system, , , irq, softirq, steal] = readFileSync("/proc/stat", "latin1")
    .slice(0, 200)
    .split("\n")[0]
    .trim()
    .split(/\s+/)
    .slice(1)
    .map(Number);
  return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS;
}

/** CPU seconds of processes that may have exited (0 for those). */
function cpuOf(pids: readonly number[]): number {
  let total = 0;
  for (const pid of pids) {
    try {
      total += cpuSeconds(pid);
    } catch {
      // gone: its time is no longer ours to count
    }
  }
  return total;
}

/**
 * Start measuring other programs' CPU use; the returned function gives it,
 * in cores, since the start. The machine may be shared (another session's
 * tests), and that load would be counted against whichever server was running.
 */
export function foreignMeter(ours: readonly number[]): () => number {
  const begun = performance.now();
  const busy0 = machineBusySeconds();
  const ours0 = cpuOf(ours);
  return () => {
    const seconds = (performance.now() - begun) / 1000;
    return Math.max(0, machineBusySeconds() - busy0 - (cpuOf(ours) - ours0)) / seconds;
  };
}

/** The machine, for the report. */
export function machine(): string {
  const os = /PRETTY_NAME="([^"]+)"/.exec(readFileSync("/etc/os-release", "utf8"))?.[1] ?? "unknown OS";
  const kernel = readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
  const cpu = cpus();
  const gib = (totalmem() / 2 ** 30).toFixed(1);
  return `${cpu[0]?.model ?? "unknown CPU"}, ${cpu.length} cores, ${gib} GiB RAM; ${os}, Linux ${kernel}`;
}
