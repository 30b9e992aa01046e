// The pool of load-generator processes (bench/client.ts, forked on Node 24)
// and the measurements built on it. run.ts decides what to measure; this file
// decides how the load is spread over the processes and how long each step may
// take.

import { fork } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { join } from "node:path";
import type { Job, LongLineResult, Reply, SessionsResult, SlowlorisResult } from "./client.ts";
import { BIN, cpuSeconds, foreignMeter, NAME, ROOT, rss, within } from "./proc.ts";

/** No step of a job may take longer than this: the bench ends even if a server hangs. */
const STEP_MS = 60_000;

/** A job without its id (the pool numbers them); distributed over the union so each kind keeps its fields. */
type Payload = Job extends infer J ? J extends Job ? Omit<J, "id"> : never : never;

export interface Client {
  readonly child: ChildProcess;
  /** Send a job; resolve with the reply for `stage` (a job may report several). */
  ask<T>(job: Payload, ...stages: string[]): Promise<T>[];
}

let nextId = 1;

function startClient(runtime: string): Client {
  const child = fork(join(ROOT, "bench", "client.ts"), [], { execPath: join(BIN, runtime), stdio: "inherit" });
  const waiting = new Map<string, { resolve(value: unknown): void; reject(error: Error): void }>();
  child.on("message", (reply: Reply) => {
    const key = `${reply.id}/${reply.stage === "error" ? "done" : reply.stage}`;
    const waiter = waiting.get(key);
    waiting.delete(key);
    if (reply.stage === "error") waiter?.reject(new Error(`client: ${reply.result}`));
    else waiter?.resolve(reply.result);
  });
  child.on("exit", () => waiting.forEach((w) => w.reject(new Error("client process exited"))));
  function ask<T>(job: Payload, ...stages: string[]): Promise<T>[] {
    const id = nextId++;
    const promises = (stages.length ? stages : ["done"]).map((stage) =>
      new Promise<T>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`client: no ${stage} for ${job.kind} in ${STEP_MS} ms`)),
          STEP_MS,
        );
        const settle = <V>(then: (value: V) => void) => (value: V) => (clearTimeout(timer), then(value));
        waiting.set(`${id}/${stage}`, { resolve: settle(resolve as (v: unknown) => void), reject: settle(reject) });
      })
    );
    child.send({ ...job, id });
    return promises;
  }
  return { child, ask };
}

export interface Pool {
  readonly clients: readonly Client[];
  /** This process and the client processes: the load generator's side. */
  readonly pids: readonly number[];
  close(): Promise<void>;
}

export function startPool(size: number, runtime = "node"): Pool {
  const clients = Array.from({ length: size }, () => startClient(runtime));
  const close = async () => {
    await Promise.all(clients.map(async ({ child, ask }) => {
      if (!child.connected) return;
      const gone = new Promise((resolve) => child.once("exit", resolve));
      void ask({ kind: "exit" })[0].catch(() => {});
      if (!(await within(gone, 3000))) child.kill();
    }));
  };
  return { clients, pids: [process.pid, ...clients.map((c) => c.child.pid!)], close };
}

/**
 * Wait (at most `maxMs`) until other programs use less than `threshold` of a
 * core for a `windowMs` window; resolves with the last reading.
 */
export async function awaitQuiet(ours: readonly number[], threshold: number, maxMs: number, windowMs = 300) {
  if (maxMs <= 0) return 0; // not asked to look
  const deadline = Date.now() + maxMs;
  for (;;) {
    const meter = foreignMeter(ours);
    await sleep(windowMs);
    const foreign = meter();
    if (foreign <= threshold || Date.now() > deadline) return foreign;
    await sleep(700);
  }
}

/** `total` split as evenly as possible over `parts`, dropping empty shares. */
export function split(total: number, parts: number): number[] {
  return Array.from({ length: parts }, (_, i) => Math.floor(total / parts) + (i < total % parts ? 1 : 0)).filter(
    (n) => n > 0,
  );
}

export interface Rate {
  sessionsPerS: number;
  failures: number;
  /** Greeting latency percentiles, ms. */
  p50: number;
  p99: number;
  /** Client processes used, and each one's CPU as a fraction of a core. */
  clientCpu: number[];
  /** The server's CPU over the window, fraction of a core (all its threads). */
  serverCpu: number;
  /** Other programs' CPU over the window, in cores (see `foreignMeter`). */
  foreign: number;
}

/** `concurrency` clients doing whole sessions for `ms`, spread over the first `processes` clients of the pool. */
export async function measureRate(
  pool: Pool,
  server: { pid: number; port: number },
  concurrency: number,
  processes: number,
  ms: number,
  leadMs: number,
): Promise<Rate> {
  const startAt = Date.now() + leadMs; // so every client process starts at the same moment
  const shares = split(concurrency, processes);
  const asked = shares.map((share, i) =>
    pool.clients[i].ask<SessionsResult>({
      kind: "sessions",
      port: server.port,
      name: NAME,
      concurrency: share,
      startAt,
      ms,
    })[0]
  );
  await sleepUntil(startAt);
  const cpu0 = cpuSeconds(server.pid);
  const foreign = foreignMeter([...pool.pids, server.pid]);
  await sleepUntil(startAt + ms);
  const serverCpu = (cpuSeconds(server.pid) - cpu0) / (ms / 1000);
  const foreignCpu = foreign();
  const results = await Promise.all(asked);
  const latencies = results.flatMap((r) => r.latencies).sort((a, b) => a - b);
  const sessions = results.reduce((sum, r) => sum + r.sessions, 0);
  return {
    sessionsPerS: sessions / (ms / 1000),
    failures: results.reduce((sum, r) => sum + r.failures, 0),
    p50: percentile(latencies, 0.5),
    p99: percentile(latencies, 0.99),
    clientCpu: results.map((r) => r.cpu),
    serverCpu,
    foreign: foreignCpu,
  };
}

/** Nearest-rank percentile of sorted values (NaN for none). */
export function percentile(sorted: readonly number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)] : NaN;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
const sleepUntil = (at: number) => sleep(at - Date.now());

/** How a settled RSS is read: the median of `rssSamples` samples `rssEveryMs` apart (one can catch a GC mid-way). */
export interface RssPace {
  rssSamples: number;
  rssEveryMs: number;
}

export async function settledRss(pid: number, pace: RssPace): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < pace.rssSamples; i++) {
    if (i) await sleep(pace.rssEveryMs);
    samples.push(rss(pid));
  }
  return samples.sort((a, b) => a - b)[Math.floor(pace.rssSamples / 2)];
}

export interface Held {
  idle: number;
  /** Connections held (that got their greeting), and RSS with them, at each step. */
  steps: { held: number; rss: number }[];
}

/**
 * Idle RSS, then RSS as `step` more idle connections are held open (across
 * the pool) `steps` times. Two steps give the marginal cost per connection,
 * free of the one-time costs (code, young-generation growth) the first
 * connections carry.
 */
export async function measureHeld(
  pool: Pool,
  server: { pid: number; port: number },
  options: RssPace & { step: number; steps: number; settleMs: number },
): Promise<Held> {
  const { step, steps, settleMs } = options;
  const idle = await settledRss(server.pid, options);
  const shares = split(step, pool.clients.length);
  const result: Held = { idle, steps: [] };
  let held = 0;
  for (let i = 0; i < steps; i++) {
    const opened = await Promise.all(
      shares.map((share, j) =>
        pool.clients[j].ask<{ held: number }>({ kind: "hold", port: server.port, count: share })[0]
      ),
    );
    held += opened.reduce((sum, h) => sum + h.held, 0);
    await sleep(settleMs);
    result.steps.push({ held, rss: await settledRss(server.pid, options) });
  }
  await Promise.all(shares.map((_, j) => pool.clients[j].ask({ kind: "release" })[0]));
  return result;
}

export interface Hostile {
  idle: number;
  peak: number;
  slowloris: SlowlorisResult;
  longLine: LongLineResult;
}

/** The hostile load: slowloris clients (a byte every dripMs, destroyed by the client after lifeMs), one long line, RSS sampled every sampleMs. */
export interface HostileLoad {
  slowloris: number;
  dripMs: number;
  lifeMs: number;
  lineBytes: number;
  lineMs: number;
  sampleMs: number;
}

/**
 * Slowloris connections across the pool and, once they are all in, one long
 * line with no newline, while RSS is sampled every `sampleMs`.
 */
export async function measureHostile(
  pool: Pool,
  server: { pid: number; port: number },
  options: RssPace & HostileLoad,
): Promise<Hostile> {
  const idle = await settledRss(server.pid, options);
  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, rss(server.pid))), options.sampleMs);
  try {
    const { slowloris: count, dripMs, lifeMs } = options;
    const asked = split(count, pool.clients.length).map((share, i) =>
      pool.clients[i].ask<SlowlorisResult | undefined>(
        { kind: "slowloris", port: server.port, count: share, dripMs, lifeMs },
        "connected",
        "done",
      )
    );
    await Promise.all(asked.map(([connected]) => connected));
    const line = pool.clients[0].ask<LongLineResult>({
      kind: "longline",
      port: server.port,
      bytes: options.lineBytes,
      maxMs: options.lineMs,
    })[0];
    const results = (await Promise.all(asked.map(([, done]) => done))) as SlowlorisResult[];
    const longLine = await line;
    await sleep(2 * options.sampleMs); // the last samples after both loads are gone
    const slowloris = {
      connected: results.reduce((sum, r) => sum + r.connected, 0),
      closedByServer: results.reduce((sum, r) => sum + r.closedByServer, 0),
      maxLifeMs: Math.max(...results.map((r) => r.maxLifeMs)),
    };
    return { idle, peak: Math.max(peak, rss(server.pid)), slowloris, longLine };
  } finally {
    clearInterval(sampler);
  }
}
