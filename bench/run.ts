// The benchmark (bench/README.md): smtp521 against the floor on Node 24, Deno
// and Bun, one server at a time, the load generator on CPU 0 and the server on
// CPU 1. Nothing here asserts about time; every figure is a ratio taken within
// one repeat or one server.
//
//   npm run bench                # full run (~10 min): bench/RESULTS.md; raw figures and logs in bench/out/
//   node bench/run.ts --smoke    # tiny counts, under a minute; writes to a temporary directory only
//   --out DIR  --runtimes node,bun  --phases rate,memory,hostile,lines,small  --repeats N  --processes N
//   --concurrencies 1,16
//   --rated baseline,floor,smtp521,control   # the servers of the speed phase, in this order (reversed every repeat)
//   --product /tmp/patched.ts    # measure another copy of smtp521.ts as "smtp521"
//   --no-pin                     # servers and load generator share the cores (HISTORY.md, 12)
//   --from bench/out/results.json  # write RESULTS.md again from a run's raw figures, measuring nothing

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import type { Script } from "./client.ts";
import * as load from "./load.ts";
import type { Impl, Pool, Runtime, Server } from "./load.ts";
import { markdown } from "./report.ts";
import type { Context, Line, Sample, Small } from "./report.ts";

const MB = 1024 * 1024;

export const FULL = {
  repeats: 3,
  /** Load-generator processes (all on CPU 0). */
  processes: 2,
  concurrencies: [1, 16, 128],
  /** Speed: a warm-up at 16 clients (Deno's JIT still tiers up in the first seconds: HISTORY.md, 8), then at each
   * concurrency `warmMs` unmeasured and `rateMs` measured. */
  rateWarmMs: 3000,
  warmMs: 500,
  rateMs: 2000,
  /** Memory: idle connections held per step (two steps); RSS readings per figure; the pause before RSS is read. */
  hold: 5000,
  settleMs: 1000,
  rssSamples: 5,
  /** Hostile: slowloris clients and one long line; smtp521's --timeout, so it closes the slowloris clients itself. */
  slowloris: 1000,
  dripMs: 300,
  lifeMs: 4000,
  lineBytes: 100 * MB,
  lineMs: 10_000,
  timeoutS: 2,
  /** Adversarial lines: rounds over the shapes, a window per shape and round at 4 clients. */
  lineRounds: 3,
  lineWindowMs: 300,
  /** Small hosts: starts timed per flag variant, connections held. */
  starts: 3,
  smallHold: 1000,
};
export type Config = typeof FULL;

export const SMOKE: Config = {
  ...FULL,
  repeats: 1,
  rateWarmMs: 100,
  warmMs: 100,
  rateMs: 200,
  hold: 500,
  settleMs: 100,
  rssSamples: 1,
  slowloris: 50,
  dripMs: 100,
  lifeMs: 400,
  lineBytes: 4 * MB,
  lineMs: 2000,
  lineRounds: 1,
  lineWindowMs: 300,
  starts: 1,
  smallHold: 100,
};

/** The runtime flags tried for a small host (bench/README.md); the first of each runtime is none. */
export const VARIANTS = Object.fromEntries(
  Object.entries({
    node: [
      "",
      "--max-semi-space-size=1",
      "--max-semi-space-size=1 --single-threaded-gc --v8-pool-size=0",
    ],
    deno: [
      "",
      "--v8-flags=--max-semi-space-size=1",
      "--v8-flags=--max-semi-space-size=1,--single-threaded-gc",
    ],
    bun: ["", "--smol"],
  }).map(([runtime, list]) => [runtime, list.map((flags) => flags.split(" ").filter(Boolean))]),
) as Record<
  Runtime,
  string[][]
>;
const cut = (line: string) => line.slice(0, 998);
const a = (n: number) => "a".repeat(n);

/** The adversarial lines of issue 15, without their CRLF; the two NOOPs first. */
export const SHAPES: [string, string][] = [
  ["NOOP (4 octets)", "NOOP"],
  ["NOOP + 993 x", cut(`NOOP ${"x".repeat(993)}`)],
  ["RCPT TO:< + tabs", cut(`RCPT TO:<${"\t".repeat(990)}`)],
  ["NOOP + spaces + x", cut(`NOOP${" ".repeat(990)}x`)],
  ["A x 990 (an unknown verb)", "A".repeat(990)],
  ["RCPT TO:< + @", cut(`RCPT TO:<${"@".repeat(990)}`)],
  ["RCPT TO:<@ + :", cut(`RCPT TO:<@${":".repeat(990)}`)],
  ["MAIL FROM: + <", cut(`MAIL FROM:${"<".repeat(990)}`)],
  ["RCPT TO:<u@[ + [", cut(`RCPT TO:<u@[${"[".repeat(990)}`)],
  ["RCPT TO:<u@[IPv6:fe80::1% + %", cut(`RCPT TO:<u@[IPv6:fe80::1%${"%".repeat(990)}`)],
  ['RCPT TO:< + "', cut(`RCPT TO:<${'"'.repeat(990)}`)],
  ["RCPT TO:< + \\", cut(`RCPT TO:<${"\\".repeat(990)}`)],
  ["RCPT TO:<u@ + a. x 490 + >", cut(`RCPT TO:<u@${"a.".repeat(490)}>`)],
  ["RCPT TO:<u@a + - x 970 + >", cut(`RCPT TO:<u@a${"-".repeat(970)}>`)],
  [
    "RCPT TO:<u@ + a valid 253-octet domain + >",
    `RCPT TO:<u@${[a(63), a(63), a(63), a(61)].join(".")}>`,
  ],
  [
    "RCPT TO: + a 256-octet path + parameters",
    cut(`RCPT TO:<u@${[a(63), a(63), a(63), a(60)].join(".")}> ${"X-P=v ".repeat(130)}`),
  ],
];

type Lines = Partial<Record<Runtime, Line[]>>;
type Smalls = Partial<Record<Runtime, Small[]>>;
const PHASES = ["rate", "memory", "hostile", "lines", "small"] as const;

const begun = Date.now();
const progress = (text: string) =>
  process.stderr.write(
    `bench ${((Date.now() - begun) / 1000).toFixed(0).padStart(4)} s: ${text}\n`,
  );
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface Where {
  runtime: Runtime;
  logs: string;
  pool: Pool;
  config: Config;
  product: string;
}

/** Start a server, run `body` against it, and stop it whatever happens. */
async function withServer<T>(
  w: Where,
  name: string,
  args: string[],
  body: (s: Server) => Promise<T>,
  flags: string[] = [],
) {
  const server = await load.startServer(
    w.runtime,
    args,
    join(w.logs, `${w.runtime}-${name}.log`),
    flags,
  );
  try {
    return await body(server);
  } finally {
    await server.stop();
  }
}

/** Speed at each concurrency, after a warm-up; each window after unmeasured load of its own. */
function ratePhase(w: Where, impl: Impl) {
  return withServer(w, `${impl}-rate`, load.serverFile(impl, w.product), async (server) => {
    await load.measureRate(w.pool, server, 16, w.config.rateWarmMs);
    const rates: Sample["rates"] = {};
    for (const c of w.config.concurrencies) {
      await load.measureRate(w.pool, server, c, w.config.warmMs);
      rates[c] = await load.measureRate(w.pool, server, c, w.config.rateMs);
    }
    return rates;
  });
}

/** Idle RSS, then with `hold` and 2 x `hold` idle connections, on a fresh process with no warm-up (HISTORY.md, 1). */
function memoryPhase(w: Where, impl: Impl) {
  return withServer(w, `${impl}-memory`, load.serverFile(impl, w.product), async (server) => {
    await sleep(w.config.settleMs);
    return await load.measureHeld(
      w.pool,
      server,
      w.config.hold,
      2,
      w.config.rssSamples,
      w.config.settleMs,
    );
  });
}

/** Peak RSS under slowloris plus a long line, on a server that has served a second of sessions. */
function hostilePhase(w: Where) {
  const args = load.serverFile("smtp521", w.product, ["--timeout", String(w.config.timeoutS)]);
  return withServer(w, "smtp521-hostile", args, async (server) => {
    await load.measureRate(w.pool, server, 8, 2 * w.config.warmMs);
    await sleep(w.config.settleMs);
    return await load.measureHostile(
      w.pool,
      server,
      w.config.slowloris,
      w.config,
      w.config.rssSamples,
    );
  });
}

/** CPU per session of EHLO, MAIL, 100 lines of one shape and QUIT, pipelined, in rcpt mode; shapes interleaved. */
function linesPhase(w: Where): Promise<Line[]> {
  const args = load.serverFile("smtp521", w.product, ["--mode", "rcpt", "--max-commands", "1000"]);
  const script = (line: string): Script => ({
    greeting: "220 ",
    send: `EHLO x\r\nMAIL FROM:<>\r\n${`${line}\r\n`.repeat(100)}QUIT\r\n`,
    closing: "221 ",
  });
  return withServer(w, "smtp521-lines", args, async (server) => {
    const cpu: number[][] = SHAPES.map(() => []);
    await load.measureRate(w.pool, server, 4, w.config.rateWarmMs, script(SHAPES[1][1]));
    for (let round = 0; round < w.config.lineRounds; round++) {
      const order = SHAPES.map((_, i) => i);
      for (const i of round % 2 ? order.reverse() : order) {
        const rate = await load.measureRate(
          w.pool,
          server,
          4,
          w.config.lineWindowMs,
          script(SHAPES[i][1]),
        );
        if (rate.failures || !rate.sessionsPerS) {
          throw new Error(`lines: ${SHAPES[i][0]}: ${rate.failures} failed`);
        }
        cpu[i].push((1e6 * rate.serverCpu) / rate.sessionsPerS);
      }
    }
    return SHAPES.map(([name, line], i) => ({ name, octets: line.length + 2, cpu: cpu[i] }));
  });
}

/** Per flag variant: start-up to the start line, idle RSS, RSS after serving 16 clients and with connections held. */
async function smallPhase(w: Where): Promise<Small[]> {
  const result: Small[] = [];
  const args = load.serverFile("smtp521", w.product);
  for (const flags of VARIANTS[w.runtime]) {
    const startMs: number[] = [];
    for (let i = 1; i < w.config.starts; i++) {
      startMs.push(
        await withServer(w, "smtp521-small", args, (s) => Promise.resolve(s.startMs), flags),
      );
    }
    result.push(
      await withServer(w, "smtp521-small", args, async (server) => {
        startMs.push(server.startMs);
        await sleep(w.config.settleMs);
        const idle = await load.settledRss(server.pid, w.config.rssSamples);
        const rate = await load.measureRate(w.pool, server, 16, w.config.rateMs);
        await sleep(w.config.settleMs);
        const served = await load.settledRss(server.pid, w.config.rssSamples);
        const held = await load.measureHeld(
          w.pool,
          server,
          w.config.smallHold,
          1,
          w.config.rssSamples,
          w.config.settleMs,
        );
        return { flags, startMs, idle, served, held: held.steps[0].rss, rate };
      }, flags),
    );
  }
  return result;
}

const sha = (file: string) =>
  createHash("sha256").update(readFileSync(file)).digest("hex").slice(0, 12);

function describeProduct(file: string): string {
  if (file !== load.PRODUCT) return `${file} (--product), sha256 ${sha(file)}`;
  const git = (...args: string[]) =>
    execFileSync("git", args, { cwd: load.ROOT, encoding: "utf8" }).trim();
  const dirty = git("status", "--porcelain", "smtp521.ts") ? " with uncommitted changes" : "";
  return `smtp521.ts at ${git("rev-parse", "--short", "HEAD")}${dirty}, sha256 ${sha(file)}`;
}

function cli(args: string[]) {
  const { values: v } = parseArgs({
    args,
    options: Object.fromEntries(
      ["out", "repeats", "processes", "runtimes", "phases", "product", "concurrencies", "rated"]
        .map((k) => [k, { type: "string" }])
        .concat(["smoke", "no-pin"].map((k) => [k, { type: "boolean" }])),
    ) as Record<string, { type: "string" | "boolean" }>,
  });
  const text = (key: string) => v[key] as string | undefined;
  const config = { ...(v.smoke ? SMOKE : FULL) };
  if (text("repeats")) config.repeats = Number(text("repeats"));
  if (text("processes")) config.processes = Number(text("processes"));
  if (text("concurrencies")) config.concurrencies = text("concurrencies")!.split(",").map(Number);
  const out = text("out")
    ? resolve(text("out")!)
    : v.smoke
    ? mkdtempSync(join(tmpdir(), "smtp521-bench-"))
    : null;
  const pick = <T extends string>(all: readonly T[], list = all.join(",")) =>
    list.split(",").filter((x): x is T => all.includes(x as T));
  return {
    config,
    smoke: Boolean(v.smoke),
    // The smoke run's tiny figures never replace the real ones.
    resultsFile: out ? join(out, "RESULTS.md") : join(load.ROOT, "bench", "RESULTS.md"),
    outDir: out ?? join(load.ROOT, "bench", "out"),
    runtimes: pick(load.RUNTIMES, text("runtimes")),
    phases: pick(PHASES, text("phases")),
    rated: pick(load.IMPLS, text("rated") ?? "floor,smtp521,control"),
    product: text("product") ? resolve(text("product")!) : load.PRODUCT,
    pin: !v["no-pin"],
  };
}

export async function main(args: string[]): Promise<number> {
  const from = args.indexOf("--from");
  if (from >= 0) {
    const raw = JSON.parse(readFileSync(args[from + 1], "utf8"));
    // A smoke run's figures never replace the real ones.
    write(
      raw.context.smoke
        ? join(resolve(args[from + 1], ".."), "RESULTS.md")
        : join(load.ROOT, "bench", "RESULTS.md"),
      raw,
    );
    return 0;
  }
  const { config, smoke, resultsFile, outDir, runtimes, phases, rated, product, pin } = cli(args);
  const logs = join(outDir, "logs");
  mkdirSync(logs, { recursive: true });
  const loadBefore = loadavg()[0];
  const productBefore = describeProduct(product);
  const pool = load.startPool(config.processes, pin);
  if (pin && !pool.pinned) {
    progress("could not pin (taskset, 2 CPUs): servers and load generator share the cores");
  }
  const samples: Sample[] = [];
  const lines: Lines = {};
  const small: Smalls = {};
  try {
    for (let repeat = 0; repeat < config.repeats; repeat++) {
      for (const runtime of runtimes) {
        const w = { runtime, logs, pool, config, product };
        const mine = load.IMPLS.map((impl): Sample => ({
          runtime,
          impl,
          repeat,
          rates: {},
          held: null,
          hostile: null,
        }));
        samples.push(...mine);
        const sample = (impl: Impl) => mine[load.IMPLS.indexOf(impl)];
        // Each pair or row of servers swaps ends every repeat: floor, smtp521, control; control, smtp521, floor.
        const swap = <T>(list: T[]) => (repeat % 2 ? list.toReversed() : list);
        if (phases.includes("rate")) {
          for (const impl of swap(rated)) sample(impl).rates = await ratePhase(w, impl);
        }
        if (phases.includes("memory")) {
          for (const impl of swap<Impl>(["baseline", "smtp521"])) {
            sample(impl).held = await memoryPhase(w, impl);
          }
        }
        if (phases.includes("hostile")) sample("smtp521").hostile = await hostilePhase(w);
        progress(`${runtime}, repeat ${repeat + 1} of ${config.repeats}: done`);
      }
    }
    for (const runtime of runtimes) {
      const w = { runtime, logs, pool, config, product };
      if (phases.includes("lines")) lines[runtime] = await linesPhase(w);
      if (phases.includes("small")) small[runtime] = await smallPhase(w);
      progress(`${runtime}: adversarial lines and small hosts done`);
    }
  } finally {
    await pool.close();
  }
  const productAfter = describeProduct(product);
  const versions = Object.fromEntries([...runtimes, "node" as const].map((r) => {
    const text = execFileSync(load.command(r)[0], ["--version"], {
      encoding: "utf8",
      timeout: 10_000,
    });
    return [r, /\d+\.\d+\.\d+/.exec(text)?.[0] ?? text.trim()];
  }));
  const context: Context = {
    smoke,
    command: ["node bench/run.ts", ...args].join(" "),
    date: new Date().toISOString(),
    machine: load.machine(),
    versions,
    // Only the content counts: commits that leave smtp521.ts alone may land meanwhile.
    product: productAfter.endsWith(productBefore.slice(-12))
      ? productBefore
      : `CHANGED DURING THE RUN: ${productBefore}, then ${productAfter}`,
    pinned: pool.pinned,
    load: [loadBefore, loadavg()[0]] as [number, number],
    wallS: (Date.now() - begun) / 1000,
    runtimes,
    config,
  };
  writeFileSync(
    join(outDir, "results.json"),
    JSON.stringify({ context, name: load.NAME, samples, lines, small }, null, 1),
  );
  write(resultsFile, { context, samples, lines, small });
  return 0;
}

/** RESULTS.md from the raw figures (`--from bench/out/results.json` writes it again without measuring). */
function write(
  file: string,
  raw: { context: Context; samples: Sample[]; lines: Lines; small: Smalls },
): void {
  // As `deno fmt` writes it: bench/ is under `deno fmt --check`.
  const text = execFileSync(join(load.BIN, "deno"), ["fmt", "--ext", "md", "-"], {
    cwd: load.ROOT,
    input: markdown(raw.samples, raw.lines, raw.small, raw.context),
    encoding: "utf8",
  });
  writeFileSync(file, text);
  process.stdout.write(text);
  progress(`wrote ${file}`);
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
