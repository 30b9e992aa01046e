// RESULTS.md from a run's raw figures: pure functions of them, so the smoke test checks the figures
// the full run writes. What the figures and the readings mean is in bench/README.md, not here.

import type { Held, Hostile, Impl, Rate, Runtime } from "./load.ts";
import type { Config } from "./run.ts";

const MB = 1024 * 1024;
const KB = 1024;

/** One server on one runtime in one repeat; phases it did not run stay empty. */
export interface Sample {
  runtime: Runtime;
  impl: Impl;
  repeat: number;
  rates: Record<string, Rate>;
  held: Held | null;
  hostile: Hostile | null;
}

/** One adversarial shape: server CPU µs per session, one value per round. */
export type Line = { name: string; octets: number; cpu: number[] };
/** One runtime flag variant on a small host: start-up times, RSS idle, after a window, held. */
export type Small = { flags: string[]; startMs: number[]; rate: Rate } & RssBytes;
type RssBytes = { idle: number; served: number; held: number };

/** A run's raw figures (results.json): RESULTS.md is written from these alone. */
export interface Raw {
  context: {
    smoke: boolean;
    command: string;
    date: string;
    machine: string;
    versions: Record<string, string>;
    product: string;
    pinned: boolean;
    load: [number, number];
    wallS: number;
    runtimes: Runtime[];
    config: Config;
  };
  samples: Sample[];
  lines: Partial<Record<Runtime, Line[]>>;
  small: Partial<Record<Runtime, Small[]>>;
}

type Get = (sample: Sample) => number | undefined;
export type Figure = { label: string; get: Get };

const cpuPerSession = (rate: Rate) => (1e6 * rate.serverCpu) / rate.sessionsPerS;
const at = (clients: number, pick: (rate: Rate) => number): Get => (s) =>
  s.rates[clients] && pick(s.rates[clients]);
const held = (pick: (held: Held) => number): Get => (s) => s.held ? pick(s.held) : undefined;
const hostile = (pick: (h: Hostile) => number): Get => (s) =>
  s.hostile ? pick(s.hostile) : undefined;
/** RSS per connection from `hold` to 2 x `hold` held: the first `hold` also pay one-time costs. */
const marginalKB = held(({ steps: [first, second] }) =>
  (second.rss - first.rss) / (second.held - first.held) / KB
);
const growthMB = hostile((h) => (h.peak - h.idle) / MB);

/** Every figure of a server, in the order of the detail tables; undefined for a phase it did not run. */
export function figures(concurrencies: readonly number[], hold: number): Figure[] {
  const perRate: [string, (rate: Rate) => number][] = [
    ["server CPU µs per session", cpuPerSession],
    ["sessions/s", (r) => r.sessionsPerS],
    ["greeting p50 ms", (r) => r.p50],
    ["greeting p99 ms", (r) => r.p99],
    ["load generator CPU, cores", (r) => r.clientCpu],
  ];
  return [
    ...perRate.flatMap(([label, pick]) =>
      concurrencies.map((c) => ({ label: `${label}, ${c} clients`, get: at(c, pick) }))
    ),
    { label: "idle RSS MB (fresh process)", get: held((h) => h.idle / MB) },
    { label: `RSS MB, ${hold} idle connections held`, get: held((h) => h.steps[0].rss / MB) },
    {
      label: `RSS per held connection KB, first ${hold}`,
      get: held((h) => (h.steps[0].rss - h.idle) / h.steps[0].held / KB),
    },
    { label: `RSS per held connection KB, next ${hold} (marginal)`, get: marginalKB },
    { label: "hostile: RSS MB before", get: hostile((h) => h.idle / MB) },
    { label: "hostile: peak - before, MB", get: growthMB },
  ];
}

const median = (values: readonly number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

/** Enough digits to compare, not more. */
const num = (value: number) =>
  value.toFixed(
    Math.min(3, Math.max(0, 2 - Math.floor(Math.log10(Math.max(Math.abs(value), 1e-3))))),
  );
const x = (ratio: number) => `${ratio.toFixed(2)}x`;
/** The median, and the range if there is more than one value. */
function cell(values: readonly number[]): string {
  if (values.length < 2) return values.length ? num(values[0]) : "-";
  return `${num(median(values))} (${num(Math.min(...values))}–${num(Math.max(...values))})`;
}
const row = (cells: readonly string[]) => `| ${cells.join(" | ")} |`;
const table = (head: readonly string[], rows: readonly (readonly string[])[]) =>
  [row(head), row(head.map(() => "---")), ...rows.map(row)].join("\n");
/** A titled table, or nothing without rows. */
const section = (title: string, head: readonly string[], rows: readonly string[][]) =>
  rows.length ? [title, table(head, rows)] : [];

/** A figure's values for one server, in repeat order. */
const series = (samples: readonly Sample[], runtime: Runtime, impl: Impl, get: Get) =>
  samples.filter((s) => s.runtime === runtime && s.impl === impl)
    .sort((a, b) => a.repeat - b.repeat).map(get).filter((v) => v !== undefined);

/** smtp521 / floor (median over the rounds) against the range of control / floor with 1. */
function againstFloor(samples: readonly Sample[], runtime: Runtime, get: Get) {
  // Round by round: the windows ran seconds apart, so drift cancels.
  const floor = series(samples, runtime, "floor", get);
  const ratios = (impl: Impl) =>
    series(samples, runtime, impl, get).slice(0, floor.length).map((v, i) => v / floor[i]);
  const mine = median(ratios("smtp521"));
  const [low, high] = [Math.min(1, ...ratios("control")), Math.max(1, ...ratios("control"))];
  const reading = mine >= low && mine <= high ? "within noise" : mine > high ? "higher" : "lower";
  return { mine, reading, text: `${x(mine)} (control ${low.toFixed(2)}–${high.toFixed(2)})` };
}

/** PASS, MISS, or (CPU only) NOISE: over the target, but no further from 1 than the control. */
type Verdict = [pass: boolean | "noise", figures: string] | null;

/** The targets (bench/README.md), a column each: the verdict per runtime, or null without the phase. */
const TARGETS: [string, (raw: Raw, runtime: Runtime) => Verdict][] = [
  ["server CPU per session, smtp521 / floor <= 1.10x", ({ samples, context }, runtime) => {
    const ratios = context.config.concurrencies.map((c) =>
      [c, againstFloor(samples, runtime, at(c, cpuPerSession))] as const
    );
    if (!ratios.every(([, { mine }]) => Number.isFinite(mine))) return null;
    const over = ratios.filter(([, { mine }]) => mine > 1.1);
    const figures = ratios.map(([c, { mine, reading }]) =>
      `${x(mine)}@${c}${mine > 1.1 && reading === "within noise" ? " (inside the control)" : ""}`
    );
    const noise = over.every(([, { reading }]) => reading === "within noise");
    return [over.length === 0 || (noise && "noise"), figures.join(", ")];
  }],
  ["RSS per held connection <= bare + 2 KB", ({ samples }, runtime) => {
    const [mine, bare] = (["smtp521", "baseline"] as const).map((impl) =>
      median(series(samples, runtime, impl, marginalKB))
    );
    const extra = mine - bare;
    if (!Number.isFinite(extra)) return null;
    return [extra <= 2, `${num(mine)} vs ${num(bare)} KB (${extra >= 0 ? "+" : ""}${num(extra)})`];
  }],
  ["hostile peak <= idle + 15 MB", ({ samples }, runtime) => {
    const growth = median(series(samples, runtime, "smtp521", growthMB));
    return Number.isFinite(growth) ? [growth <= 15, `+${num(growth)} MB`] : null;
  }],
  ["worst adversarial line / 1000-octet NOOP <= 2x", ({ lines }, runtime) => {
    if (!lines[runtime]) return null;
    const [short, long, valid, ...shapes] = lines[runtime].map((l) => ({
      ...l,
      cpu: median(l.cpu),
    }));
    const worst = shapes.reduce((a, b) => (b.cpu > a.cpu ? b : a));
    const [perLong, perShort] = [x(worst.cpu / long.cpu), x(worst.cpu / short.cpu)];
    const figures = `${perLong} (${perShort} the 4-octet NOOP; ${worst.name}); ` +
      `the dearest valid line ${x(valid.cpu / long.cpu)}`;
    return [worst.cpu / long.cpu <= 2, figures];
  }],
];

function header({ context: c }: Raw): string[] {
  const { config } = c;
  return [
    `# smtp521 benchmark results${c.smoke ? " (SMOKE RUN: tiny counts, meaningless)" : ""}`,
    `\`${c.command}\` (\`npm run bench\`), ${c.date}, ${(c.wallS / 60).toFixed(1)} min; ` +
    `load average (1 min) ${c.load[0].toFixed(2)} before, ${c.load[1].toFixed(2)} after. ` +
    "What each server and figure is: [README.md](README.md); how the bench came to be and what " +
    "was changed for the targets: [HISTORY.md](HISTORY.md).",
    [
      `- Machine: ${c.machine}`,
      `- Runtimes: ${c.runtimes.map((r) => `${r} ${c.versions[r]}`).join(", ")}; load generator: ` +
      `bench/client.ts on Node ${c.versions.node}, ${config.processes} processes; ` +
      (c.pinned ? "pinned to CPU 0, servers to CPU 1" : "NOT PINNED: servers and load share cores"),
      `- Product: ${c.product}`,
      `- Settings: speed: the three servers at once, ${config.rateWarmMs / 1000} s warm-up each, ` +
      `then at ${config.concurrencies.join(", ")} clients ${config.rounds} rounds of a ` +
      `${config.rateMs / 1000} s window each; ` +
      `${config.repeats} repeats of memory: ${config.hold} then ${2 * config.hold} idle ` +
      `connections on a fresh process; and of ` +
      `hostile: ${config.slowloris} slowloris + a ${config.lineBytes / MB} MB line, ` +
      `\`--timeout ${config.timeoutS}\`; lines: ${config.lineRounds} rounds of ` +
      `${config.lineWindowMs / 1000} s per shape at 4 clients; small hosts: ${config.starts} ` +
      `starts, ${config.smallHold} connections held`,
    ].join("\n"),
  ];
}

/** Each runtime's servers against the floor at each concurrency, with the control's range. */
function speed({ samples, context: { runtimes, config } }: Raw): string[] {
  const measured = samples.some((s) => Object.keys(s.rates).length);
  const rows = !measured ? [] : runtimes.flatMap((runtime) =>
    config.concurrencies.map((c) => {
      const [cpu, rate, p99] = [cpuPerSession, (r: Rate) => r.sessionsPerS, (r: Rate) => r.p99]
        .map((pick) => againstFloor(samples, runtime, at(c, pick)));
      return [runtime, String(c), cpu.text, rate.text, rate.reading, p99.text, p99.reading];
    })
  );
  const head = "runtime|clients|server CPU per session|sessions/s|reading|greeting p99|reading";
  return section("## Speed: smtp521 / floor, control / floor", head.split("|"), rows);
}

/** Per runtime, every figure of every server: median (min–max) over the rounds or repeats. */
function details({ samples, context: { runtimes, config, versions } }: Raw): string[] {
  const all = figures(config.concurrencies, config.hold);
  return runtimes.flatMap((runtime) => {
    const values = (impl: Impl, f: Figure) => series(samples, runtime, impl, f.get);
    const has = (impl: Impl) => (f: Figure) => values(impl, f).length > 0;
    const impls = (["floor", "smtp521", "control", "baseline"] as const)
      .filter((impl) => all.some(has(impl)));
    const rows = all.filter((f) => impls.some((impl) => has(impl)(f)))
      .map((f) => [f.label, ...impls.map((impl) => cell(values(impl, f)))]);
    const title = `## ${runtime} ${versions[runtime]}: median (min–max) over the rounds or repeats`;
    return section(title, ["figure", ...impls], rows);
  });
}

/** Each shape's CPU per session, and against each NOOP, per runtime. */
function adversarial({ lines, context: { runtimes } }: Raw): string[] {
  const shown = runtimes.filter((r) => lines[r]);
  const rows = (shown.length ? lines[shown[0]]! : []).map((line, i) => [
    line.name.replaceAll("|", "\\|"),
    String(line.octets),
    ...shown.map((runtime) => {
      const [short, long, mine] = [0, 1, i].map((j) => median(lines[runtime]![j].cpu));
      return `${num(mine)} (${x(mine / long)}, ${x(mine / short)})`;
    }),
  ]);
  const title = "## Adversarial lines (rcpt mode): server CPU µs per session of 100 such lines, " +
    "and / each NOOP";
  return section(title, ["line", "octets", ...shown], rows);
}

function smallHosts({ small, context: { runtimes, config } }: Raw): string[] {
  const rows = runtimes.flatMap((runtime) =>
    (small[runtime] ?? []).map((v) => [
      runtime,
      v.flags.length ? `\`${v.flags.join(" ")}\`` : "(none)",
      cell(v.startMs),
      ...[v.idle, v.served, v.held].map((bytes) => num(bytes / MB)),
      num(cpuPerSession(v.rate)),
      String(v.rate.failures),
    ])
  );
  const head = "runtime|flags|start-up ms|idle RSS MB|RSS MB after 16 clients|" +
    `RSS MB, ${config.smallHold} held|CPU µs per session|failed`;
  return section("## Small hosts: smtp521 with runtime flags", head.split("|"), rows);
}

export function markdown(raw: Raw): string {
  const targets = raw.context.runtimes.map((runtime) => [
    runtime,
    ...TARGETS.map(([, judge]) => {
      const verdict = judge(raw, runtime);
      const word = verdict?.[0] === "noise" ? "NOISE" : verdict?.[0] ? "PASS" : "MISS";
      return verdict ? `**${word}** ${verdict[1]}` : "-";
    }),
  ]);
  return [
    ...header(raw),
    "## Targets",
    table(["runtime", ...TARGETS.map(([head]) => head)], targets),
    ...speed(raw),
    ...details(raw),
    ...adversarial(raw),
    ...smallHosts(raw),
  ].join("\n\n") + "\n";
}
