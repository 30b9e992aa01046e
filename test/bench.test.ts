// The benchmark (bench/run.ts, bench/README.md) in its smoke mode: tiny
// counts, on all three runtimes. Nothing here is about speed: the test checks
// that every figure comes out as a finite positive number, that the floor
// does the work it stands for, that the report has a verdict per target and
// runtime, and that the smoke run leaves the real bench/RESULTS.md alone.

import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expect, it } from "vitest";
import { SHAPES, VARIANTS } from "../bench/run.ts";
import { figures, type Raw } from "../bench/report.ts";
import { BIN, ROOT, run } from "./helpers.ts";

const EVERY_RUNTIME = ["node", "deno", "bun"] as const;
const RESULTS = join(ROOT, "bench", "RESULTS.md");

const positive = (value: number | undefined, what: string) =>
  expect(value !== undefined && Number.isFinite(value) && value > 0, `${what}: ${value}`).toBe(
    true,
  );

it(
  "bench/run.ts --smoke: a finite positive figure for every server, shape and flag variant on every runtime",
  async () => {
    const out = mkdtempSync(join(tmpdir(), "smtp521-bench-test-"));
    const before = existsSync(RESULTS) ? readFileSync(RESULTS, "utf8") : null;
    try {
      const { code, stdout, stderr } = await run(join(BIN, "node"), [
        join(ROOT, "bench", "run.ts"),
        "--smoke",
        "--out",
        out,
      ], {
        timeout: 170_000,
      });
      expect(code, stderr).toBe(0);
      const { context: { config }, samples, lines, small } = JSON.parse(
        readFileSync(join(out, "results.json"), "utf8"),
      ) as Raw;

      // Speed from the floor, smtp521 and the control; memory from the bare responder and smtp521; hostile from smtp521.
      for (const sample of samples) {
        const name = `${sample.runtime} ${sample.impl}`;
        const rated = ["floor", "smtp521", "control"].includes(sample.impl);
        expect(Object.keys(sample.rates).length, name).toBe(
          rated ? config.concurrencies.length : 0,
        );
        expect(sample.held !== null, name).toBe(["baseline", "smtp521"].includes(sample.impl));
        expect(sample.hostile !== null, name).toBe(sample.impl === "smtp521");
        for (const figure of figures(config.concurrencies, config.hold)) {
          const value = figure.get(sample);
          if (value === undefined) continue; // a phase this server does not run
          // Peak minus idle may be zero for a tiny load.
          if (figure.label.startsWith("hostile: peak")) {
            expect(value >= 0, `${name} ${figure.label}`).toBe(true);
          } else positive(value, `${name} ${figure.label}`);
        }
        for (const rate of Object.values(sample.rates)) {
          expect(rate.failures, `${name}: failed sessions`).toBe(0);
        }
      }
      expect(new Set(samples.map((s) => `${s.runtime} ${s.impl}`)).size).toBe(12);

      // The floor does the work it stands for: a session line, with the client's address and port, per session.
      for (const runtime of EVERY_RUNTIME) {
        const log = readFileSync(join(out, "logs", `${runtime}-floor-speed.log`), "utf8");
        const quits = log.match(
          /^time=\S+Z event=session remote=127\.0\.0\.1:\d+ local_port=\d+ mode=greet duration_ms=\d+ lines=1 end=quit$/gm,
        );
        const rates = samples.find((s) => s.runtime === runtime && s.impl === "floor")!.rates;
        const counted = Object.values(rates).reduce(
          (n, r) => n + r.sessionsPerS * config.rateMs / 1000,
          0,
        );
        expect(quits?.length ?? 0, `${runtime} floor session lines`).toBeGreaterThanOrEqual(
          Math.round(counted),
        );
        // Every adversarial shape and every small-host flag variant, measured.
        expect(lines[runtime]!.map((l) => l.name)).toEqual(SHAPES.map(([name]) => name));
        for (const line of lines[runtime]!) {
          for (const cpu of line.cpu) positive(cpu, `${runtime} ${line.name}`);
        }
        expect(small[runtime]!.map((v) => v.flags)).toEqual(VARIANTS[runtime]);
        for (const v of small[runtime]!) {
          for (const value of [...v.startMs, v.idle, v.served, v.held, v.rate.serverCpu]) {
            positive(value, `${runtime} ${v.flags.join(" ")}`);
          }
          expect(v.rate.failures).toBe(0);
        }
      }

      // A verdict for every target on every runtime; the speed figures beside them, with the control's range.
      const markdown = readFileSync(join(out, "RESULTS.md"), "utf8");
      expect(stdout).toBe(markdown);
      for (const runtime of EVERY_RUNTIME) {
        expect(markdown).toMatch(
          new RegExp(`^\\| ${runtime} +(\\| \\*\\*(PASS|MISS|NOISE)\\*\\* [^|]+){4}\\|$`, "m"),
        );
        expect(markdown).toMatch(
          new RegExp(`^\\| ${runtime} +\\| 16 +\\| [\\d.]+x \\(control [\\d.]+–[\\d.]+\\)`, "m"),
        );
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
    // The smoke run's figures never replace the real ones.
    expect(existsSync(RESULTS) ? readFileSync(RESULTS, "utf8") : null).toBe(before);
  },
  180_000,
);
