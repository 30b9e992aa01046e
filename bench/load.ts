// Servers and load for the benchmark: a server on a runtime (on its own CPU, stderr in a file, its
// port read from its start line), the load-generator processes (bench/client.ts), and the
// measurements made with them, the server's CPU and memory read from /proc (Linux).

import { type ChildProcess, execFileSync, fork, spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import type { HostileResult, Job, Script, SessionsResult } from "./client.ts";
import type { Config } from "./run.ts";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
export const BIN = join(ROOT, "node_modules", ".bin");
export const PRODUCT = join(ROOT, "smtp521.ts");
const NAME = "bench.example";
export const RUNTIME_NAMES = ["node", "deno", "bun"] as const;
export type Runtime = (typeof RUNTIME_NAMES)[number];
/** The servers (bench/README.md): the bare responder, the floor, smtp521, the control (the floor's file again). */
export const IMPLS = ["baseline", "floor", "smtp521", "control"] as const;
export type Impl = (typeof IMPLS)[number];

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** How each runtime runs a .ts file with runtime `flags`; Deno with the product's only permission. */
const command = (runtime: Runtime, flags: readonly string[]) =>
  runtime === "deno"
    ? [join(BIN, "deno"), "run", ...flags, "--allow-net", "--no-prompt"]
    : [join(BIN, runtime), ...flags];

/** A server's file and arguments: smtp521 (`product`) as in production, its limits out of the way. */
function serverArgs(impl: Impl, product: string, extra: readonly string[]): string[] {
  const bare = join(ROOT, "bench", "bare.ts");
  if (impl !== "smtp521") return impl === "baseline" ? [bare] : [bare, "--floor"];
  const limits = ["--max-per-ip", "100000", "--max-connections", "100000"];
  return [product, "--listen", "127.0.0.1:0", "--hostname", NAME, ...limits, ...extra];
}

/** The load-generator processes, and the CPU the servers run on when pinned. */
let clients: ChildProcess[] = [];
let serverCpu: string | null = null;

/**
 * Fork `count` load-generator processes. With `pin`, this process is pinned to CPU 0 first (the
 * clients inherit it) and every server then to the last CPU. Whether that pinning took.
 */
export function startClients(count: number, pin: boolean): boolean {
  if (pin && cpus().length > 1) {
    try {
      execFileSync("taskset", ["-a", "-p", "-c", "0", String(process.pid)], { stdio: "ignore" });
      serverCpu = String(cpus().length - 1);
    } catch { /* no taskset: servers and load share the cores */ }
  }
  const client = join(ROOT, "bench", "client.ts");
  clients = Array.from({ length: count }, () => fork(client, { execPath: join(BIN, "node") }));
  return serverCpu !== null;
}

/** The clients have nothing to finish: every job has been answered by now. */
export const stopClients = () => clients.forEach((child) => child.kill());

/** `job` to a client process (one at a time); its answer, or an error after 60 s (if a server hangs). */
const ask = <T>(child: ChildProcess, job: Job) =>
  new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`client: no ${job.kind} in 60 s`)), 60_000);
    child.once("message", ({ result, error }: { result?: T; error?: string }) => {
      clearTimeout(timer);
      if (error) reject(new Error(`client: ${error}`));
      else resolve(result!);
    });
    child.send(job);
  });

/** `total` split as evenly as can be over the client processes, a job for each non-empty share. */
const spread = <T>(total: number, job: (share: number, i: number) => Job) =>
  Promise.all(
    clients.map((_, i) => Math.floor(total / clients.length) + (i < total % clients.length ? 1 : 0))
      .filter((share) => share > 0).map((share, i) => ask<T>(clients[i], job(share, i))),
  );

/** What a phase needs: the runtime under test, the settings, the product's file, the logs' directory. */
export type Bench = { runtime: Runtime; config: Config; product: string; logs: string };
/** A running server; `startMs` from spawn to its start line (written once listening), polled every 2 ms. */
export type Server = { pid: number; port: number; startMs: number };

/**
 * `body` against `impl` on the runtime, started afresh with runtime `flags` and smtp521's `extra`
 * arguments (15 s at most to its start line), stopped whatever happens; its stderr in
 * `logs`/<runtime>-<impl>-<phase>.log.
 */
export async function withServer<T>(
  { runtime, product, logs }: Bench,
  impl: Impl,
  phase: string,
  body: (server: Server) => T | Promise<T>,
  { extra = [], flags = [] }: { extra?: string[]; flags?: string[] } = {},
): Promise<T> {
  const log = join(logs, `${runtime}-${impl}-${phase}.log`);
  const pinning = serverCpu ? ["taskset", "-c", serverCpu] : [];
  const args = [...pinning, ...command(runtime, flags), ...serverArgs(impl, product, extra)];
  const [program, ...rest] = args;
  const fd = openSync(log, "w");
  const spawned = performance.now();
  const child = spawn(program, rest, { cwd: ROOT, stdio: ["ignore", "ignore", fd] });
  closeSync(fd);
  const exited = new Promise((resolve) => child.once("exit", resolve));
  try {
    let port = 0;
    for (const end = Date.now() + 15_000; !port && Date.now() < end && child.exitCode === null;) {
      await sleep(2);
      port = Number(/ event=start .* listen=\S*:(\d+)/.exec(readFileSync(log, "utf8"))?.[1] ?? 0);
    }
    const startMs = performance.now() - spawned;
    if (!port) {
      throw new Error(`no start line from ${rest.join(" ")}:\n${readFileSync(log, "utf8")}`);
    }
    return await body({ pid: child.pid!, port, startMs });
  } finally {
    child.kill("SIGTERM"); // smtp521 drains for up to 5 s; nothing is open by now
    const killer = setTimeout(() => child.kill("SIGKILL"), 8000);
    await exited.finally(() => clearTimeout(killer));
  }
}

/** Resident set size in bytes (VmRSS). */
const rss = (pid: number) =>
  Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "latin1"))![1]) * 1024;

/** User plus system CPU seconds of a process so far, all threads (USER_HZ is 100 on every Linux this runs on). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // the name may hold spaces
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

export function machine(): string {
  const os = /PRETTY_NAME="([^"]+)"/.exec(readFileSync("/etc/os-release", "utf8"))?.[1];
  const kernel = readFileSync("/proc/sys/kernel/osrelease", "utf8").trim();
  const ram = (totalmem() / 2 ** 30).toFixed(1);
  return `${cpus()[0]?.model}, ${cpus().length} cores, ${ram} GiB RAM; ${os}, Linux ${kernel}`;
}

/** The session of the speed figures: the 521 greeting, QUIT, the 221. */
const GREET: Script = {
  greeting: `521 ${NAME} does not accept mail\r\n`,
  send: "QUIT\r\n",
  closing: `221 ${NAME} closing connection`,
};

/** A window of sessions: sessions/s, failed sessions, greeting latency p50 and p99 (ms), and the
 * CPU of the load generator (its processes) and of the server over the window, in cores. */
export type Rate = Awaited<ReturnType<typeof measureRate>>;

/** `concurrency` clients doing whole sessions for `ms`, spread over the pool; they start together after 150 ms. */
export async function measureRate(server: Server, concurrency: number, ms: number, script = GREET) {
  const startAt = Date.now() + 150;
  const job = { kind: "sessions", port: server.port, script, startAt, ms } as const;
  const asked = spread<SessionsResult>(concurrency, (share) => ({ ...job, concurrency: share }));
  await sleep(startAt - Date.now());
  const cpu0 = cpuSeconds(server.pid);
  await sleep(startAt + ms - Date.now());
  const serverCpu = (cpuSeconds(server.pid) - cpu0) / (ms / 1000);
  const results = await asked;
  const latencies = results.flatMap((r) => r.latencies).sort((a, b) => a - b);
  const percentile = (p: number) =>
    latencies[Math.min(latencies.length - 1, Math.ceil(p * latencies.length) - 1)];
  const sum = (pick: (r: SessionsResult) => number) => results.reduce((n, r) => n + pick(r), 0);
  return {
    sessionsPerS: latencies.length / (ms / 1000),
    failures: sum((r) => r.failures),
    p50: percentile(0.5),
    p99: percentile(0.99),
    clientCpu: sum((r) => r.cpu),
    serverCpu,
  };
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

/** Idle RSS, then the connections held (that got their greeting) and RSS with them at each step. */
export type Held = { idle: number; steps: { held: number; rss: number }[] };

/** Idle RSS, then RSS as `step` more idle connections are held, `steps` times, `settleMs` after each. */
export async function measureHeld(server: Server, step: number, steps: number, config: Config) {
  const { rssSamples, settleMs } = config;
  const result: Held = { idle: await settledRss(server.pid, rssSamples), steps: [] };
  for (let i = 0, held = 0; i < steps; i++) {
    const hold = { kind: "hold", port: server.port } as const;
    const opened = await spread<number>(step, (count) => ({ ...hold, count }));
    held += opened.reduce((a, b) => a + b, 0);
    await sleep(settleMs);
    result.steps.push({ held, rss: await settledRss(server.pid, rssSamples) });
  }
  await spread(clients.length, () => ({ kind: "release" }));
  return result;
}

/** RSS before and at the peak, and what each client process did (HostileResult). */
export type Hostile = { idle: number; peak: number; clients: HostileResult[] };

/** `slowloris` connections across the pool plus one long line, while RSS is sampled every 50 ms. */
export async function measureHostile(server: Server, config: Config): Promise<Hostile> {
  const { slowloris, rssSamples, ...load } = config;
  const idle = await settledRss(server.pid, rssSamples);
  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, rss(server.pid))), 50);
  try {
    // One long line in all, from the first process.
    const clients = await spread<HostileResult>(slowloris, (count, i) => (
      { kind: "hostile", port: server.port, ...load, count, lineBytes: i ? 0 : load.lineBytes }
    ));
    await sleep(100); // the last samples after both loads are gone
    return { idle, peak: Math.max(peak, rss(server.pid)), clients };
  } finally {
    clearInterval(sampler);
  }
}
