// The benchmark of issue 7: smtp521 against a bare node:net responder on
// Node 24, Deno and Bun, one server at a time, interleaved over the repeats.
//
//   npm run bench                      # full run (~18 min): bench/RESULTS.md, raw data and logs in bench/out/
//   node bench/run.ts --smoke          # tiny counts, a few seconds; writes to a temp dir only
//   node bench/run.ts --out DIR        # everything (RESULTS.md too) under DIR
//   --runtimes node,bun  --impls baseline,smtp521  --repeats N  --processes N
//                                      # a part of the run (the report needs the baseline)
//   --product /tmp/patched.ts          # measure another copy of smtp521.ts as "smtp521"
//
// Every figure is also taken for the baseline in the same repeat, back to
// back, and reported as the ratio smtp521 / baseline, so the machine's speed
// and the runtime's own cost drop out. Nothing here asserts about time.

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { awaitQuiet, measureHeld, measureHostile, measureRate } from "./load.ts";
import type { HostileLoad, Pool, Rate } from "./load.ts";
import { startPool } from "./load.ts";
import { BIN, command, FILES, IMPLS, machine, NAME, ROOT, RUNTIMES, serverArgs, startServer } from "./proc.ts";
import type { Impl, Runtime } from "./proc.ts";
import { marginal, markdown, NATIVE, targets } from "./report.ts";
import type { Context, Sample } from "./report.ts";

export interface Config extends HostileLoad {
  repeats: number;
  /** Client processes for the multi-client runs (N); the baseline is also run with N+1. */
  processes: number;
  concurrencies: number[];
  /** Each rate measurement. */
  rateMs: number;
  /** The warm-up that starts a rate phase, at 16 clients. */
  rateWarmMs: number;
  /** The unmeasured load before each rate measurement, at its concurrency; the hostile phase's warm-up. */
  warmMs: number;
  /** Idle connections held per step (two steps) for the memory figures, and the pause before RSS is read. */
  hold: number;
  settleMs: number;
  /** smtp521's --timeout in the hostile phase, so it closes the slowloris clients itself. */
  timeoutS: number;
  /**
   * The machine may be shared: other programs' CPU (in cores) above which a
   * rate window is measured again (at most `retries` times), and how long to
   * wait for quiet before each server starts.
   */
  foreignMax: number;
  retries: number;
  quietMs: number;
  /** Lead time for the client processes to start together; RSS samples per reading and their spacing. */
  leadMs: number;
  rssSamples: number;
  rssEveryMs: number;
}

const MB = 1024 * 1024;
/** Kept by hand: each change made for the targets, with its figures before and after; copied into RESULTS.md. */
const HISTORY = join(ROOT, "bench", "HISTORY.md");

export const FULL: Config = {
  repeats: 3,
  // On the 2-core machine, 2 processes left the baseline 3-7 % short of what 3 reach; 3 -> 4 gained nothing.
  processes: 3,
  concurrencies: [1, 16, 128],
  rateMs: 3000,
  // 1 s was too short: Deno's JIT still tiered up some 100 functions in the first window measured after it, and that
  // window's p99 at 1 client came out 0.37-0.44 ms where the next ones gave 0.20-0.23 (bench/HISTORY.md, item 8).
  rateWarmMs: 5000,
  warmMs: 1000,
  hold: 5000,
  settleMs: 1000,
  slowloris: 1000,
  dripMs: 300,
  lifeMs: 4000,
  lineBytes: 100 * MB,
  lineMs: 10_000,
  sampleMs: 50,
  timeoutS: 2,
  foreignMax: 0.2,
  retries: 2,
  quietMs: 10_000,
  leadMs: 150,
  rssSamples: 5,
  rssEveryMs: 100,
};

export const SMOKE: Config = {
  ...FULL,
  repeats: 1,
  rateMs: 200,
  rateWarmMs: 100,
  warmMs: 100,
  hold: 500,
  settleMs: 100,
  slowloris: 50,
  dripMs: 100,
  lifeMs: 400,
  lineBytes: 4 * MB,
  lineMs: 2000,
  retries: 0,
  quietMs: 0,
  leadMs: 50,
  rssSamples: 1,
  rssEveryMs: 0,
};

const elapsed = (() => {
  const begun = Date.now();
  return () => `${((Date.now() - begun) / 1000).toFixed(0).padStart(4)} s`;
})();
const progress = (text: string) => process.stderr.write(`bench ${elapsed()}: ${text}\n`);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The servers measured on a runtime: the baseline, the floor, smtp521 and the
 * control, then the runtime's native responder if it has one. The baseline and
 * the control take the ends and swap them every repeat, as smtp521 and the
 * floor do the middle, so smtp521 and the control each meet the baseline in
 * the same order, and smtp521 and the floor do.
 */
function implsFor(runtime: Runtime, repeat: number, only: readonly Impl[]): Impl[] {
  const order: Impl[] = repeat % 2
    ? ["control", "smtp521", "floor", "baseline"]
    : ["baseline", "floor", "smtp521", "control"];
  const native = NATIVE[runtime];
  return (native ? [...order, native] : order).filter((impl) => only.includes(impl));
}

interface Where {
  runtime: Runtime;
  impl: Impl;
  logs: string;
  pool: Pool;
  config: Config;
  /** The file run as smtp521 (`--product`, e.g. a patched copy to compare). */
  product: string;
}

/** A rate measurement, taken again (up to `config.retries` times) if other programs took CPU during it. */
async function steadyRate(where: Where, server: { pid: number; port: number }, c: number, processes: number) {
  const { pool, config } = where;
  for (let attempt = 0;; attempt++) {
    const rate = await measureRate(pool, server, c, processes, config.rateMs, config.leadMs);
    if (rate.foreign <= config.foreignMax || attempt >= config.retries) return rate;
    progress(
      `${where.runtime} ${where.impl} @${c}: other programs took ${(100 * rate.foreign).toFixed(0)} % of a core; again`,
    );
    await awaitQuiet(pool.pids.concat(server.pid), config.foreignMax / 2, config.quietMs);
  }
}

/** Start a server once the machine is quiet, run `body` against it, and stop it whatever happens. */
async function withServer<T>(
  where: Where,
  phase: string,
  body: (s: { pid: number; port: number }) => Promise<T>,
  timeoutS?: number,
) {
  const { pool, config } = where;
  const foreign = await awaitQuiet(pool.pids, config.foreignMax / 2, config.quietMs);
  if (foreign > config.foreignMax / 2) {
    progress(`other programs use ${(100 * foreign).toFixed(0)} % of a core; going on`);
  }
  const log = join(where.logs, `${where.runtime}-${where.impl}-${phase}.log`);
  const file = where.impl === "smtp521" ? where.product : FILES[where.impl];
  const server = await startServer(where.runtime, where.impl, log, timeoutS, file);
  try {
    return await body(server);
  } finally {
    await server.stop();
  }
}

/**
 * Sessions/s and greeting latency at each concurrency, after a warm-up; the baseline also with N+1 client processes.
 * Each window follows a second of the same load, unmeasured: the switch from one load to the next is not measured.
 */
async function ratePhase(where: Where): Promise<Record<string, Rate>> {
  const { pool, config } = where;
  return await withServer(where, "rate", async (server) => {
    const measured = async (c: number, processes: number) => {
      await measureRate(pool, server, c, processes, config.warmMs, config.leadMs);
      return await steadyRate(where, server, c, processes);
    };
    const rates: Record<string, Rate> = {};
    await measureRate(pool, server, 16, config.processes, config.rateWarmMs, config.leadMs); // JIT and buffers warm
    for (const c of config.concurrencies) rates[String(c)] = await measured(c, Math.min(c, config.processes));
    if (where.impl === "baseline") rates["16@N+1"] = await measured(16, config.processes + 1);
    return rates;
  });
}

/**
 * Idle RSS and RSS with `hold`, then 2 x `hold` idle connections, on a fresh
 * process with no warm-up: a warm-up leaves tens of MB of touched, free heap
 * (V8's young generation) that the first thousands of connections fill
 * without raising RSS, which made the per-connection cost swing from run to run.
 */
async function memoryPhase(where: Where) {
  const { pool, config } = where;
  return await withServer(where, "memory", async (server) => {
    await sleep(config.settleMs); // start-up finishes (Deno grows a little after its start line)
    return await measureHeld(pool, server, { ...config, step: config.hold, steps: 2 });
  });
}

/** Peak RSS during slowloris plus a long line, on a fresh process (smtp521 with --timeout). */
async function hostilePhase(where: Where) {
  const { pool, config } = where;
  const timeoutS = where.impl === "smtp521" ? config.timeoutS : undefined;
  return await withServer(where, "hostile", async (server) => {
    await measureRate(pool, server, 8, 1, config.warmMs, config.leadMs);
    await sleep(config.settleMs);
    return await measureHostile(pool, server, config);
  }, timeoutS);
}

async function measure(where: Where, repeat: number): Promise<Sample> {
  const rates = await ratePhase(where);
  // The control tells how far the speed figures move between two runs of one file, the floor what SPEC's
  // per-session work costs in speed: neither question is about memory.
  const held = where.impl === "control" || where.impl === "floor" ? null : await memoryPhase(where);
  // The native responders are only compared on rate and memory (issue 7, item 5).
  const hostile = where.impl === "baseline" || where.impl === "smtp521" ? await hostilePhase(where) : null;
  const failures = Object.values(rates).reduce((sum, r) => sum + r.failures, 0);
  progress(
    `${where.runtime} ${where.impl} #${repeat + 1}: ${
      Object.entries(rates).map(([c, r]) => `${r.sessionsPerS.toFixed(0)}/s@${c}`).join(" ")
    }` +
      (held ? `, ${(marginal(held) / 1024).toFixed(2)} KB/conn` : "") +
      (hostile ? `, hostile +${((hostile.peak - hostile.idle) / MB).toFixed(1)} MB` : "") +
      (failures ? `, ${failures} failed sessions` : ""),
  );
  return { runtime: where.runtime, impl: where.impl, repeat, rates, held, hostile };
}

/** `--version` of each runtime, as the report states them. */
function versions(runtimes: readonly Runtime[]): Record<string, string> {
  const result: Record<string, string> = {};
  for (const runtime of runtimes) {
    const [program] = command(runtime);
    const text = execFileSync(program, ["--version"], { encoding: "utf8", timeout: 10_000 }).trim().split("\n")[0];
    const version = /\d+\.\d+\.\d+/.exec(text)?.[0] ?? text;
    result[runtime] = `${{ node: "Node", deno: "Deno", bun: "Bun" }[runtime]} ${version}`;
  }
  result["load generator"] = `bench/client.ts on ${join("node_modules", ".bin", "node")} (Node ${
    execFileSync(join(BIN, "node"), ["--version"], { encoding: "utf8" }).trim().replace(/^v/, "")
  })`;
  return result;
}

/**
 * The report as `deno fmt` (the project's deno.json, lines of 120) would write
 * it: bench/RESULTS.md is under `deno fmt --check` in CI. Unformatted if the
 * formatter cannot run; the figures matter more than the wrapping.
 */
function formatted(text: string): string {
  try {
    return execFileSync(join(BIN, "deno"), ["fmt", "--ext", "md", "-"], {
      cwd: ROOT,
      input: text,
      encoding: "utf8",
      timeout: 30_000,
    });
  } catch (error) {
    progress(`deno fmt failed (${(error as Error).message.split("\n")[0]}); RESULTS.md left unwrapped`);
    return text;
  }
}

/** The measured file's content, for telling whether it changed during the run. */
const contentSha = (file: string) => createHash("sha256").update(readFileSync(file)).digest("hex").slice(0, 12);

/** Which smtp521 was measured: the commit, whether the working copy differs from it, and its content hash. */
function describeProduct(file: string): string {
  const sha = `sha256 ${contentSha(file)}`;
  if (file !== FILES.smtp521) return `${file} (--product), ${sha}`;
  try {
    const commit = execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: ROOT, encoding: "utf8" }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain", "smtp521.ts"], { cwd: ROOT, encoding: "utf8" }).trim();
    return `smtp521.ts at ${commit}${dirty ? " with uncommitted changes" : ""}, ${sha}`;
  } catch {
    return `smtp521.ts (no git), ${sha}`;
  }
}

function settings(config: Config): string {
  return [
    `${config.repeats} repeats, servers one at a time, interleaved (baseline, floor, smtp521, control in one ` +
    `repeat; control, smtp521, floor, baseline in the next; the control is the baseline's file again, the floor ` +
    `bench/floor.ts, both rate phase only)`,
    `rate: a ${config.rateWarmMs / 1000} s warm-up at 16 clients, then at each concurrency ${
      config.warmMs / 1000
    } s unmeasured and ${config.rateMs / 1000} s measured, ` +
    `clients over ${config.processes} Node processes (1 for 1 client)`,
    `session = connect, read the 521 greeting, send QUIT, read the 221, close on the server's FIN; ` +
    `greeting latency from connect() to the whole greeting line`,
    `memory: fresh process, no warm-up, median of 5 VmRSS samples idle, with ${config.hold} and with ${
      2 * config.hold
    } ` +
    `idle connections held; per connection: the RSS from ${config.hold} to ${2 * config.hold} held / ${config.hold}`,
    `hostile: fresh process (smtp521 --timeout ${config.timeoutS}) warmed up by ${
      config.warmMs / 1000
    } s of sessions ` +
    `(a server that has served), then ${config.slowloris} slowloris clients ` +
    `(a byte every ${config.dripMs} ms, no newline, closed by the client after ${config.lifeMs / 1000} s) ` +
    `plus one ${config.lineBytes / MB} MB line with no newline; VmRSS sampled every ${config.sampleMs} ms`,
    `smtp521: \`${["<runtime>", "smtp521.ts", ...serverArgs("smtp521")].join(" ")}\`, stderr (text logs) to a file`,
  ].join("; ");
}

interface Cli {
  config: Config;
  smoke: boolean;
  /** RESULTS.md goes here; raw results and logs too, or under bench/out for the full run. */
  resultsFile: string;
  outDir: string;
  runtimes: readonly Runtime[];
  product: string;
  /** `--impls baseline,smtp521`: measure only these servers (the report needs the baseline). */
  impls: readonly Impl[];
}

function cli(args: string[]): Cli {
  const { values } = parseArgs({
    args,
    options: {
      smoke: { type: "boolean", default: false },
      out: { type: "string" },
      repeats: { type: "string" },
      runtimes: { type: "string" },
      product: { type: "string" },
      impls: { type: "string" },
      processes: { type: "string" },
    },
  });
  const config = { ...(values.smoke ? SMOKE : FULL) };
  if (values.repeats) config.repeats = Number(values.repeats);
  if (values.processes) config.processes = Number(values.processes);
  const outDir = values.out
    ? resolve(values.out)
    : values.smoke
    ? mkdtempSync(join(tmpdir(), "smtp521-bench-"))
    : join(ROOT, "bench", "out");
  const resultsFile = values.out || values.smoke ? join(outDir, "RESULTS.md") : join(ROOT, "bench", "RESULTS.md");
  // The smoke run's tiny figures must never replace the real ones.
  if (values.smoke && resultsFile === join(ROOT, "bench", "RESULTS.md")) {
    throw new Error("--smoke never writes bench/RESULTS.md");
  }
  const runtimes = values.runtimes ? RUNTIMES.filter((r) => values.runtimes!.split(",").includes(r)) : RUNTIMES;
  const product = values.product ? resolve(values.product) : FILES.smtp521;
  const impls = values.impls ? IMPLS.filter((i) => values.impls!.split(",").includes(i)) : IMPLS;
  return { config, smoke: values.smoke, resultsFile, outDir, runtimes, product, impls };
}

export async function main(args: string[]): Promise<number> {
  const { config, smoke, resultsFile, outDir, runtimes, product, impls } = cli(args);
  const logs = join(outDir, "logs");
  mkdirSync(logs, { recursive: true });
  // The product may be edited while the bench runs: say so rather than mix two versions silently.
  // (Only its content counts: commits that leave smtp521.ts alone may land meanwhile.)
  const productBefore = describeProduct(product);
  const shaBefore = contentSha(product);
  const pool = startPool(config.processes + 1);
  const samples: Sample[] = [];
  try {
    for (let repeat = 0; repeat < config.repeats; repeat++) {
      for (const runtime of runtimes) {
        for (const impl of implsFor(runtime, repeat, impls)) {
          samples.push(await measure({ runtime, impl, logs, pool, config, product }, repeat));
        }
      }
    }
  } finally {
    await pool.close();
  }
  const context: Context = {
    title: smoke ? "smtp521 benchmark (SMOKE RUN: tiny counts, figures meaningless)" : "smtp521 benchmark results",
    generated: `Generated by \`${["node bench/run.ts", ...args].join(" ")}\` (\`npm run bench\` runs it with no ` +
      `arguments) on ${new Date().toISOString()}.`,
    machine: machine(),
    versions: versions(runtimes),
    product: contentSha(product) === shaBefore
      ? productBefore
      : `CHANGED DURING THE RUN: ${productBefore}, then ${describeProduct(product)}`,
    settings: settings(config),
    runtimes,
    concurrencies: config.concurrencies,
    hold: config.hold,
    processes: config.processes,
    foreignMax: config.foreignMax,
    history: existsSync(HISTORY) ? readFileSync(HISTORY, "utf8") : undefined,
  };
  const text = formatted(markdown(samples, context));
  const verdicts = runtimes.flatMap((runtime) => targets(samples, runtime, config.concurrencies, config.hold));
  writeFileSync(
    join(outDir, "results.json"),
    JSON.stringify({ context, config, name: NAME, verdicts, samples }, null, 1),
  );
  writeFileSync(resultsFile, text);
  process.stdout.write(text);
  progress(`wrote ${resultsFile} and ${join(outDir, "results.json")}`);
  return 0;
}

if (import.meta.main) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (error: Error) => {
      process.stderr.write(`bench: ${error.stack ?? error}\n`);
      process.exitCode = 1;
    },
  );
}
