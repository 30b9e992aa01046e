// The benchmark (bench/run.ts, issue 7) in its smoke mode: tiny counts, on
// all three runtimes, in a few seconds. Nothing here is about speed: the test
// checks that every figure comes out as a finite positive number, that the
// report has a row per runtime, and that the smoke run leaves the real
// bench/RESULTS.md alone.

import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { expect, it } from "vitest";
import type { Config } from "../bench/run.ts";
import { figures, type Sample, type Target } from "../bench/report.ts";
import { BIN, ROOT, run } from "./helpers.ts";

const RUNTIMES = ["node", "deno", "bun"];
const RESULTS = join(ROOT, "bench", "RESULTS.md");

interface Output {
  config: Config;
  samples: Sample[];
  verdicts: Target[];
}

it("bench/run.ts --smoke: a finite positive figure for every server on every runtime, a row per runtime", async () => {
  const out = mkdtempSync(join(tmpdir(), "smtp521-bench-test-"));
  const before = existsSync(RESULTS) ? readFileSync(RESULTS, "utf8") : null;
  try {
    const bench = join(ROOT, "bench", "run.ts");
    const { code, stdout, stderr } = await run(join(BIN, "node"), [bench, "--smoke", "--out", out], {
      timeout: 80_000,
    });
    expect(code, stderr).toBe(0);

    const { config, samples, verdicts } = JSON.parse(readFileSync(join(out, "results.json"), "utf8")) as Output;
    expect(new Set(samples.map((s) => `${s.runtime} ${s.impl}`))).toEqual(
      new Set(
        RUNTIMES.flatMap((r) => [`${r} baseline`, `${r} smtp521`, `${r} control`, `${r} floor`])
          .concat(["deno deno-listen", "bun bun-listen"]),
      ),
    );
    // The control and the floor run the rate phase only: their speed is the question, their memory the baseline's.
    for (const sample of samples) {
      expect(sample.held === null, `${sample.runtime} ${sample.impl}`).toBe(["control", "floor"].includes(sample.impl));
    }
    // The floor does the work it stands for: a session line, with the client's address and port, per session.
    for (const runtime of RUNTIMES) {
      const log = readFileSync(join(out, "logs", `${runtime}-floor-rate.log`), "utf8");
      const quits = log.match(
        /^time=\S+Z event=session remote=127\.0\.0\.1:\d+ local_port=\d+ mode=greet duration_ms=\d+ lines=1 end=quit$/gm,
      );
      const counted = samples.filter((s) => s.runtime === runtime && s.impl === "floor")
        .reduce(
          (sum, s) => sum + Object.values(s.rates).reduce((n, r) => n + r.sessionsPerS * config.rateMs / 1000, 0),
          0,
        );
      expect(quits?.length ?? 0, `${runtime} floor session lines`).toBeGreaterThanOrEqual(Math.round(counted));
    }
    for (const sample of samples) {
      for (const figure of figures(config.concurrencies, config.hold)) {
        const value = figure.get(sample);
        if (value === undefined) continue; // a phase this server does not run (the native responders' hostile load)
        // Peak minus idle may be zero for a tiny load; everything else is a count, a time or a size.
        const floor = figure.key === "hostileGrowth" ? 0 : Number.MIN_VALUE;
        expect(Number.isFinite(value) && value >= floor, `${sample.runtime} ${sample.impl} ${figure.label}: ${value}`)
          .toBe(true);
      }
      const failures = Object.values(sample.rates).reduce((sum, rate) => sum + rate.failures, 0);
      expect(failures, `${sample.runtime} ${sample.impl}: failed sessions`).toBe(0);
    }
    expect(verdicts.map((t) => t.runtime)).toEqual(RUNTIMES.flatMap((r) => Array(4).fill(r)));

    // RESULTS-style output: printed, written to --out, a target row and a figures table per runtime.
    // (deno fmt pads the columns of a table narrow enough to fit its line width.)
    const markdown = readFileSync(join(out, "RESULTS.md"), "utf8");
    expect(stdout).toBe(markdown);
    for (const runtime of RUNTIMES) {
      expect(markdown).toMatch(new RegExp(`^\\| ${runtime} +\\| \\*\\*(PASS|MISS)\\*\\*`, "m"));
      expect(markdown).toMatch(new RegExp(`^## .*${runtime}.*: smtp521 against the node:net baseline$`, "im"));
    }
    for (const runtime of RUNTIMES) {
      // The control's ratios under the targets, and its figures against the baseline's.
      expect(markdown).toMatch(new RegExp(`^\\| ${runtime} +\\| [\\d.]+x@1, [\\d.]+x@16, [\\d.]+x@128 +\\|`, "m"));
      expect(markdown).toMatch(new RegExp(`^\\| ${runtime} +\\| greeting p99 ms, 16 clients +\\|`, "m"));
    }
    // The floor's ratios under the targets, and its figures against the baseline's and smtp521's.
    const summaryAt = markdown.indexOf("The floor is the baseline plus");
    const floorSummary = markdown.slice(summaryAt, markdown.indexOf("\n## ", summaryAt));
    const floorSection = markdown.slice(markdown.indexOf("## The floor:")).split("\n## ")[0];
    for (const runtime of RUNTIMES) {
      expect(floorSummary).toMatch(new RegExp(`^\\| ${runtime} +\\| [\\d.]+x@1, [\\d.]+x@16, [\\d.]+x@128 +\\|`, "m"));
      expect(floorSection).toMatch(new RegExp(`^\\| ${runtime} +\\| server CPU µs per session, 16 clients +\\|`, "m"));
    }
    expect(markdown).toMatch(/^\| deno: Deno\.listen +\| sessions\/s, 16 clients +\|/m);
    expect(markdown).toMatch(/^\| bun: Bun\.listen +\| sessions\/s, 16 clients +\|/m);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
  // The smoke run's figures never replace the real ones.
  expect(existsSync(RESULTS) ? readFileSync(RESULTS, "utf8") : null).toBe(before);
}, 90_000);
