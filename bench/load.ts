// Servers and load for the benchmark: starting a server on a runtime (pinned
// to its own CPU, stderr in a file, its port read from its start line), the
// pool of load-generator processes (bench/client.ts), and the measurements
// built on them, reading the server's CPU and memory from /proc (Linux).

import { execFileSync, fork, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import type { Job, Script, SessionsResult } from "./client.ts";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
export const BIN = join(ROOT, "node_modules", ".bin");
export const PRODUCT = join(ROOT, "smtp521.ts");
export const NAME = "bench.example";
export const RUNTIMES = ["node", "deno", "bun"] as const;
export type Runtime = (typeof RUNTIMES)[number];
/** The servers (bench/README.md): the bare responder, the floor, smtp521, the control (the floor's file again). */
export const IMPLS = ["baseline", "floor", "smtp521", "control"] as const;
export type Impl = (typeof IMPLS)[number];

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** How each runtime runs a .ts file, with runtime `flags`; Deno with the product's only permission. */
export function command(runtime: Runtime, flags: readonly string[] = []): string[] {
  if (runtime === "deno") return [join(BIN, "deno"), "run", ...flags, "--allow-net", "--no-prompt"];
  return [join(BIN, runtime), ...flags];
}

/** A server's file and arguments: smtp521 (`product`) as in production, limits out of the load's way, plus `extra`. */
export function serverFile(impl: Impl, product: string, extra: readonly string[] = []): string[] {
  const common = ["--listen", "127.0.0.1:0", "--hostname", NAME, ...extra];
  if (impl === "smtp521") {
    return [product, ...common, "--max-per-ip", "100000", "--max-connections", "100000"];
  }
  return [join(ROOT, "bench", "bare.ts"), ...common, ...(impl === "baseline" ? [] : ["--floor"])];
}

/** The CPU the servers run on, once `startPool` has pinned the load generator to CPU 0. */
let serverCpu: string | null = null;

function pin(pid: number, cpu: string): boolean {
  try {
    execFileSync("taskset", ["-a", "-p", "-c", cpu, String(pid)], {
      stdio: "ignore",
      timeout: 5000,
    });
    return true;
  } catch {
    return false;
  }
}

export interface Server {
  readonly pid: number;
  readonly port: number;
  /** From spawn to the start line (written once listening), polled every 2 ms. */
  readonly startMs: number;
  stop(): Promise<void>;
}

/** Start `args` on `runtime` with stderr in `logFile`; resolve once its start line names its port (at most 15 s). */
export async function startServer(
  runtime: Runtime,
  args: string[],
  logFile: string,
  flags: string[] = [],
) {
  const [program, ...rest] = [
    ...(serverCpu ? ["taskset", "-c", serverCpu] : []),
    ...command(runtime, flags),
    ...args,
  ];
  const log = openSync(logFile, "w");
  const spawned = performance.now();
  const child = spawn(program, rest, { cwd: ROOT, stdio: ["ignore", "ignore", log] });
  closeSync(log);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let port = 0;
  for (
    const deadline = Date.now() + 15_000;
    !port && Date.now() < deadline && child.exitCode === null;
  ) {
    await sleep(2);
    port = Number(/ event=start .* listen=\S*:(\d+)/.exec(readFileSync(logFile, "utf8"))?.[1] ?? 0);
  }
  const startMs = performance.now() - spawned;
  const stop = async () => {
    child.kill("SIGTERM"); // smtp521 drains for up to 5 s; nothing is open by now
    if (await within(exited, 8000)) return;
    child.kill("SIGKILL");
    await exited;
  };
  if (!port) await stop();
  if (!port) {
    throw new Error(
      `no start line from ${child.spawnargs.join(" ")}:\n${readFileSync(logFile, "utf8")}`,
    );
  }
  return { pid: child.pid!, port, startMs, stop } satisfies Server;
}

async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  return await Promise.race([promise.then(() => true), late]).finally(() => clearTimeout(timer));
}

/** Resident set size in bytes (VmRSS). */
export const rss = (pid: number) =>
  Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "latin1"))![1]) * 1024;

/** User plus system CPU seconds of a process so far, all threads (USER_HZ is 100 on every Linux this runs on). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // the name may hold spaces
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

export function machine(): string {
  const os = /PRETTY_NAME="([^"]+)"/.exec(readFileSync("/etc/os-release", "utf8"))?.[1] ??
    "unknown OS";
  const kernel = readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
  return `${cpus()[0]?.model}, ${cpus().length} cores, ${
    (totalmem() / 2 ** 30).toFixed(1)
  } GiB RAM; ${os}, ` +
    `Linux ${kernel}`;
}

export interface Pool {
  /** Send `job` to client process `i`; resolves with its result (rejects after 60 s: the bench ends even if a server hangs). */
  ask<T>(i: number, job: Job): Promise<T>;
  readonly size: number;
  /** Whether the load generator runs on CPU 0 and the servers on the last CPU. */
  readonly pinned: boolean;
  close(): Promise<void>;
}

export function startPool(size: number, pinned: boolean): Pool {
  let nextId = 1;
  const waiting = new Map<number, (reply: { result?: unknown; error?: string }) => void>();
  const children: ChildProcess[] = Array.from({ length: size }, () => {
    const child = fork(join(ROOT, "bench", "client.ts"), [], {
      execPath: join(BIN, "node"),
      stdio: "inherit",
    });
    child.on(
      "message",
      (reply: { id: number; result?: unknown; error?: string }) => waiting.get(reply.id)?.(reply),
    );
    return child;
  });
  pinned &&= cpus().length > 1 &&
    [process.pid, ...children.map((c) => c.pid!)].every((pid) => pin(pid, "0"));
  if (pinned) serverCpu = String(cpus().length - 1);
  const ask = <T>(i: number, job: Job) =>
    new Promise<T>((resolve, reject) => {
      const id = nextId++;
      const timer = setTimeout(
        () => reject(new Error(`client: no answer to ${job.kind} in 60 s`)),
        60_000,
      );
      waiting.set(id, ({ result, error }) => {
        clearTimeout(timer);
        waiting.delete(id);
        if (error) reject(new Error(`client: ${error}`));
        else resolve(result as T);
      });
      children[i].send({ id, job });
    });
  const close = async () => {
    await Promise.all(children.map(async (child) => {
      const gone = new Promise((resolve) => child.once("exit", resolve));
      if (child.connected) child.send({ id: 0, job: { kind: "exit" } });
      if (!(await within(gone, 3000))) child.kill();
    }));
  };
  return { ask, size, pinned, close };
}

/** `total` split as evenly as possible over `parts`, dropping empty shares. */
const split = (total: number, parts: number) =>
  Array.from({ length: parts }, (_, i) => Math.floor(total / parts) + (i < total % parts ? 1 : 0))
    .filter((n) => n);

export interface Rate {
  sessionsPerS: number;
  failures: number;
  /** Greeting latency percentiles, ms. */
  p50: number;
  p99: number;
  /** The load generator's CPU (its processes), and the server's, over the window, in cores. */
  clientCpu: number;
  serverCpu: number;
}

/** The session of the speed figures: the 521 greeting, QUIT, the 221. */
export const GREET: Script = {
  greeting: `521 ${NAME} does not accept mail\r\n`,
  send: "QUIT\r\n",
  closing: `221 ${NAME} closing connection`,
};

/** `concurrency` clients doing whole sessions for `ms`, spread over the pool; they start together after 150 ms. */
export async function measureRate(
  pool: Pool,
  server: Server,
  concurrency: number,
  ms: number,
  script = GREET,
) {
  const startAt = Date.now() + 150;
  const asked = split(concurrency, pool.size).map((share, i) =>
    pool.ask<SessionsResult>(i, {
      kind: "sessions",
      port: server.port,
      script,
      concurrency: share,
      startAt,
      ms,
    })
  );
  await sleep(startAt - Date.now());
  const cpu0 = cpuSeconds(server.pid);
  await sleep(startAt + ms - Date.now());
  const serverCpu = (cpuSeconds(server.pid) - cpu0) / (ms / 1000);
  const results = await Promise.all(asked);
  const latencies = results.flatMap((r) => r.latencies).sort((a, b) => a - b);
  const percentile = (p: number) =>
    latencies[Math.min(latencies.length - 1, Math.ceil(p * latencies.length) - 1)];
  return {
    sessionsPerS: latencies.length / (ms / 1000),
    failures: results.reduce((sum, r) => sum + r.failures, 0),
    p50: percentile(0.5),
    p99: percentile(0.99),
    clientCpu: results.reduce((sum, r) => sum + r.cpu, 0),
    serverCpu,
  } satisfies Rate;
}

/** RSS read `samples` times 100 ms apart, the median (one reading can catch a GC mid-way). */
export async function settledRss(pid: number, samples: number): Promise<number> {
  const readings: number[] = [];
  for (let i = 0; i < samples; i++) {
    if (i) await sleep(100);
    readings.push(rss(pid));
  }
  return readings.sort((a, b) => a - b)[samples >> 1];
}

export interface Held {
  idle: number;
  /** Connections held (that got their greeting), and RSS with them, at each step. */
  steps: { held: number; rss: number }[];
}

/** Idle RSS, then RSS as `step` more idle connections are held `steps` times (the marginal cost per connection). */
export async function measureHeld(
  pool: Pool,
  server: Server,
  step: number,
  steps: number,
  samples: number,
  settleMs: number,
) {
  const result: Held = { idle: await settledRss(server.pid, samples), steps: [] };
  for (let i = 0, held = 0; i < steps; i++) {
    const opened = split(step, pool.size).map((count, j) =>
      pool.ask<number>(j, { kind: "hold", port: server.port, count })
    );
    held += (await Promise.all(opened)).reduce((a, b) => a + b, 0);
    await sleep(settleMs);
    result.steps.push({ held, rss: await settledRss(server.pid, samples) });
  }
  await Promise.all(Array.from({ length: pool.size }, (_, j) => pool.ask(j, { kind: "release" })));
  return result;
}

export interface Hostile {
  idle: number;
  peak: number;
  /** Per client process: slowloris connections, how many the server closed first, bytes of the long line sent. */
  clients: { connected: number; closedByServer: number; lineSent: number }[];
}

export type HostileLoad = Pick<
  Extract<Job, { kind: "hostile" }>,
  "dripMs" | "lifeMs" | "lineBytes" | "lineMs"
>;

/** Slowloris connections across the pool plus one long line, while RSS is sampled every 50 ms. */
export async function measureHostile(
  pool: Pool,
  server: Server,
  count: number,
  load: HostileLoad,
  samples: number,
) {
  const idle = await settledRss(server.pid, samples);
  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, rss(server.pid))), 50);
  try {
    const clients = await Promise.all(
      split(count, pool.size).map((share, i) =>
        pool.ask<Hostile["clients"][number]>(i, {
          kind: "hostile",
          port: server.port,
          count: share,
          ...load,
          lineBytes: i ? 0 : load.lineBytes,
        })
      ),
    );
    await sleep(100); // the last samples after both loads are gone
    return { idle, peak: Math.max(peak, rss(server.pid)), clients } satisfies Hostile;
  } finally {
    clearInterval(sampler);
  }
}
