"""`--mode ablation` over seeds: the per-seed results of each row summarised (mean ± std), the
paper's components judged against the seed-to-seed spread, and the tables.

Pure functions on plain dicts; experiment.ablation runs the rows and writes what these return.
A row's result for one seed is {split: {target: {metric: value or None}}} with METRICS.

Verdict of a component (a pair of (row, target) cells whose difference the paper reports): the
per-seed differences d_s = with_s - without_s (paired: both cells ran with seed s, so the
init and data order they share cancel), their mean and sample standard deviation (ddof 1); the
component's effect "exceeds two standard deviations in the paper's direction" when
mean > 2 * sd and the mean has the paper's sign (every component here raises mIoU).
"""

import dataclasses

import numpy as np

METRICS = ("miou", "precision", "recall", "confusion_ratio")
LABELS = {"miou": "mIoU", "precision": "precision", "recall": "recall", "confusion_ratio": "FP/TP"}


@dataclasses.dataclass(frozen=True)
class Component:
  """A claim of the paper: `better` minus `worse` (each (row key, eval target)) raises mIoU."""

  name: str
  better: tuple[str, str]
  worse: tuple[str, str]
  paper: str  # The paper's figures, for the table.


# Table 4 (initial CAM) and Table 3 (pseudo-labels on train), then the headline segmentation.
COMPONENTS = (
  Component("CMPA: initial CAM (Table 4)", ("cmpa", "cam"), ("baseline", "cam"), "58.6 -> 63.3"),
  Component(
    "Cross- vs intra-modal contrast (Table 4)",
    ("cmpa", "cam"),
    ("cmpa_intra", "cam"),
    "57.8 -> 63.3",
  ),
  Component("+ CLIP attention (Table 3)", ("cmpa", "pseudo"), ("cmpa", "cam"), "63.3 -> 74.6"),
  Component(
    "+ DINO attention (Table 3)", ("cmpa_dino", "pseudo"), ("cmpa", "pseudo"), "74.6 -> 76.3"
  ),
  Component("+ SGC mask (Table 3)", ("ssr", "pseudo"), ("cmpa_dino", "pseudo"), "76.3 -> 78.7"),
  Component("SSR vs WeCLIP: segmentation", ("ssr", "seg"), ("baseline", "seg"), "76.4 -> 78.2"),
)


def mean_std(values) -> dict:
  """{"mean", "std", "n"} of the defined values (None skipped): sample std (ddof 1), 0.0 for a
  single value; mean and std None when no value is defined."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return dict(mean=None, std=None, n=0)
  return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v))


def summarize(per_seed: dict) -> dict:
  """{seed: {split: {target: {metric: value}}}} -> {split: {target: {metric: mean_std}}}."""
  runs = list(per_seed.values())
  out = {}
  for split, targets in runs[0].items():
    out[split] = {
      t: {m: mean_std([r[split][t].get(m) for r in runs]) for m in metrics}
      for t, metrics in targets.items()
    }
  return out


def paired_effect(better: list, worse: list) -> dict:
  """Mean and sample std of the per-seed differences better - worse, and the verdict: True when
  the mean exceeds 2 std in the positive direction, None with fewer than 2 seeds."""
  d = np.asarray(better, np.float64) - np.asarray(worse, np.float64)
  s = mean_std(d.tolist())
  exceeds = None if s["n"] < 2 else bool(s["mean"] > 0 and s["mean"] > 2 * s["std"])
  return dict(effect=s["mean"], std=s["std"], n=s["n"], exceeds=exceeds)


def verdicts(rows: list) -> list:
  """For each of COMPONENTS whose rows were run, on each split: its paired_effect on mIoU.

  rows: [{"key", "per_seed": {seed: {split: {target: {metric: value}}}}}] (one seed list)."""
  by_key = {r["key"]: r["per_seed"] for r in rows}
  out = []
  for c in COMPONENTS:
    (bk, bt), (wk, wt) = c.better, c.worse
    if bk not in by_key or wk not in by_key:
      continue
    seeds = sorted(set(by_key[bk]) & set(by_key[wk]))
    for split in by_key[bk][seeds[0]]:
      if bt not in by_key[bk][seeds[0]][split] or wt not in by_key[wk][seeds[0]][split]:
        continue
      better = [by_key[bk][s][split][bt]["miou"] for s in seeds]
      worse = [by_key[wk][s][split][wt]["miou"] for s in seeds]
      out.append(dict(component=c.name, paper=c.paper, split=split, **paired_effect(better, worse)))
  return out


def _cell(s: dict) -> str:
  """mean ± std; the mean alone from one seed (no spread to show), "-" when undefined."""
  if s["mean"] is None:
    return "-"
  return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def _verdict(v) -> str:
  if v["exceeds"] is None:
    return "n/a (one seed)"
  return "**yes**" if v["exceeds"] else "no"


def markdown(rows: list, components: list, *, title: str) -> str:
  """ablation.md: mIoU and precision / recall / FP/TP tables (mean ± std over seeds), each row's
  run time, and the per-component verdicts.

  rows: [{"variant", "summary": summarize(...), "seconds": {seed: s}}]."""
  targets = list(next(iter(rows[0]["summary"].values())))
  lines = [title, "", "mIoU, mean ± std over seeds:", ""]
  lines += ["| variant | split | " + " | ".join(targets) + " | s / seed |"]
  lines += ["|---" * (len(targets) + 3) + "|"]
  for r in rows:
    sec = np.mean(list(r["seconds"].values()))
    for split, per_t in r["summary"].items():
      cells = " | ".join(_cell(per_t[t]["miou"]) for t in targets)
      lines.append(f"| {r['variant']} | {split} | {cells} | {sec:.0f} |")
  lines += ["", "Precision / recall / confusion ratio FP/TP, mean ± std over seeds:", ""]
  other = [m for m in METRICS if m != "miou"]
  lines += ["| variant | split | target | " + " | ".join(LABELS[m] for m in other) + " |"]
  lines += ["|---" * (len(other) + 3) + "|"]
  for r in rows:
    for split, per_t in r["summary"].items():
      for t in targets:
        cells = " | ".join(_cell(per_t[t][m]) for m in other)
        lines.append(f"| {r['variant']} | {split} | {t} | {cells} |")
  lines += [
    "",
    "Per component: mIoU difference paired by seed (mean ± sample std); does it exceed two "
    "standard deviations in the paper's direction (up)?",
    "",
    "| component | paper (VOC) | split | effect | verdict |",
    "|---|---|---|---|---|",
  ]
  for v in components:
    effect = "-" if v["effect"] is None else f"{v['effect']:+.3f} ± {v['std']:.3f}"
    lines.append(f"| {v['component']} | {v['paper']} | {v['split']} | {effect} | {_verdict(v)} |")
  return "\n".join(lines) + "\n"
