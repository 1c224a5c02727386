"""Many runs at once: load results trees, summarise them over seeds, and define the rows, the
columns and their order. ``scripts/make_tables.py`` and ``scripts/make_figures.py`` take all of
that from here, so a table and a figure of the same runs always show the same numbers.

- :func:`load` reads every ``results.json`` under run / multirun directories, with its Hydra
  overrides (``.hydra/overrides.yaml``): the *setting* (overrides other than ``seed``, the
  aggregator's, the logger's, paths and Hydra's) and the aggregator *variant*
  (``aggregator.*`` overrides).
- :func:`summarize` turns them into :class:`Row` s, one per (setting, network), each metric a
  :class:`Stat` over the runs that differ only in ``seed``; :func:`read_summary` reads the same
  rows back from the CSV that ``make_tables.py --out`` writes, so committed tables can be redrawn.
- Rows, in order: the warm-start base, the experts (mean and best), the output ensemble, the soup,
  then each aggregator (soups first, as in the paper). With ``aggregator=soup`` the aggregate *is*
  the soup, so it is not repeated.
- :func:`environments`: where a table's numbers came from (each run's ``provenance``, written by
  :mod:`ame.provenance`, and that of the runs that made the cached experts, base and reference
  metrics it reused), one entry per distinct environment; :func:`environment_line` says it in one
  line, :func:`mismatches` what makes rows of one table hard to compare (other commits or versions).
  The CSV carries them (``environments``, JSON), so a table redrawn from it says the same.
- :data:`COLUMNS`: in-distribution accuracy and NLL, corruption accuracy (``ood/acc``: the 15
  standard CIFAR-10-C corruptions; older results: the corruptions they evaluated), the extra
  corruptions, the four corruption families, the worst shard, and the distance moved. Only the
  columns some row has are shown.
- Paired differences (:data:`PAIRED_COLUMNS`): each network minus the soup of the same experts
  (``vs_soup/…``) and minus the base they were fine-tuned from (``vs_base/…``), expert set by
  expert set, with 95 % confidence intervals (Student t over expert sets). Runs with a
  ``base_seed`` override are grouped by it (:data:`FACTOR`: several independently trained bases):
  the mean is the mean over bases of each base's mean over its expert sets, and its interval is
  the t interval of that mean with the within-base spread (pooled variance, n − B degrees of
  freedom): bases as a fixed factor, so it holds for these bases, not for a new one. The distances
  moved are summarised the same way; the other absolute columns are the plain mean ± std over all
  runs (between-base spread included). :func:`per_set` keeps each expert set's own Δs
  (:attr:`Row.per_set`, from results trees only), for ``make_tables.py --each-set`` and the
  circles of ``make_figures.py deltas``; :func:`contrast` pairs two rows the same way, expert set
  by expert set (``make_tables.py --contrast``: does tuned AME beat a tuned control?).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ame.errors import AMEError


@dataclass(frozen=True)
class Column:
    key: str  # the metric's key in results.json
    short: str  # table header
    long: str  # figure axis label
    percent: bool = True  # accuracies: shown ×100


COLUMNS = [
    Column("id/acc", "ID acc", "test accuracy (%)"),
    Column("id/nll", "ID NLL", "test negative log-likelihood", percent=False),
    Column("ood/acc", "OOD acc", "accuracy under corruptions (%)"),
    Column("ood/extra_acc", "OOD extra", "accuracy under the extra corruptions (%)"),
    Column("ood/noise/acc", "noise", "accuracy under noise corruptions (%)"),
    Column("ood/blur/acc", "blur", "accuracy under blur corruptions (%)"),
    Column("ood/weather/acc", "weather", "accuracy under weather corruptions (%)"),
    Column("ood/digital/acc", "digital", "accuracy under digital corruptions (%)"),
    Column("shard/min_acc", "worst shard", "worst-shard accuracy (%)"),
    # experts against the base on each expert's own shard mix (the base row: its mean over the shards)
    Column("shard/own_acc", "own shard", "accuracy on the own shard's class mix (%)"),
    Column("shard/own_gain", "gain on own shard", "own-shard accuracy minus the base's (points)"),
    Column("shard/own_gain_min", "min gain", "the smallest expert's own-shard gain over the base (points)"),
    Column("shard/beats_base", "beat base", "share of experts beating the base on their own shard (%)"),
    Column("dist/pivot", "dist. to pivot", "distance to the pivot (relative to ‖pivot − soup‖)", percent=False),
    Column("dist/soup", "dist. to soup", "distance to the soup (relative to ‖pivot − soup‖)", percent=False),
]
BY_KEY = {c.key: c for c in COLUMNS}
PAIRED = ["id/acc", "ood/acc", "shard/min_acc"]
_SHORT = {"id/acc": "ID", "ood/acc": "OOD", "shard/min_acc": "worst shard"}
# each network minus the soup of the same experts, and minus their base, expert set by expert set
# (make_tables' second table, make_figures' deltas)
PAIRED_COLUMNS = [Column(f"vs_{ref}/{k}", f"Δ {_SHORT[k]} vs {ref}", f"{BY_KEY[k].long.replace(' (%)', '')} minus the "
                         f"{ref}'s (points)") for ref in ("soup", "base") for k in PAIRED] \
    + [BY_KEY["dist/pivot"], BY_KEY["dist/soup"]]
FACTOR = "base_seed"  # an override that names an independently trained base: grouped, not a setting

ORDER = ["soup", "weighted_soup", "ame_sgd", "ame_adam", "ame_adamw", "ame_adagrad", "ame_adadelta", "ame_rmsprop",
         "task_arithmetic", "ties", "dare", "greedy_soup", "ensemble"]  # aggregator rows: soups first, as in the paper
NAMES = {"soup": "soup", "weighted_soup": "weighted soup", "ame_sgd": "AME-SGD", "ame_adam": "AME-Adam",
         "ame_adamw": "AME-AdamW", "ame_adagrad": "AME-Adagrad", "ame_adadelta": "AME-Adadelta",
         "ame_rmsprop": "AME-RMSprop", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE",
         "greedy_soup": "greedy soup (uses validation data)", "ensemble": "output ensemble (N networks)"}
LABEL = "label"  # ``+label=<name>``: the run's row, whatever its aggregator.* overrides (e.g. chosen per expert set)
IGNORED = ("seed=", f"{FACTOR}=", f"{LABEL}=", "hydra.", "hydra/", "logger", "paths.", "experiment=", "tags=", "task_name=",
           "debug=", "optimized_metric=",  # a tuned run is marked by its results (tuned_on_validation)
           "data.root=", "data.dataset.root=", "data.dataset.cache_dir=")  # where the data lie (its content: data.fingerprint)

# how an override reads in a title or legend: key → (format of the value)
_SETTING_WORDS = {"data/shards": "{} shards", "data.shards.alpha": "α = {}", "train.init": "{} init",
                  "train.optimizer.lr": "expert lr {}", "train.epochs": "{} expert epochs",
                  "data.shards.num_shards": "N = {}", "align": "alignment: {}", "model": "model {}", "data": "{}",
                  "aggregator.optimizer.lr": "lr {}", "aggregator.pivot": "pivot {}",
                  "aggregator.epochs": "{} ensembling epochs", "aggregator.amplification": "ζ = {}",
                  "aggregator.pseudogradient": "{} pseudogradient", "aggregator.order": "{} order",
                  "aggregator.lr_schedule": "{} lr schedule", "regime": "{} regime"}
_VALUE_WORDS = {"regime": {"strong": "strong (ResNet-20)", "small_cnn": "small-CNN"},
                "train.init": {"warm": "warm-start", "shared": "shared random", "independent": "independent"},
                "data/shards": {"iid": "iid", "dirichlet": "Dirichlet", "classes": "class-split"},
                "align": {"none": "none", "weight_matching": "weight matching"},
                "data": {"cifar10_shards": "CIFAR-10", "cifar100_shards": "CIFAR-100", "digits_shards": "digits",
                         "gld23k": "GLD-23K"}}
AXIS_WORDS = {"train.epochs": "experts' training epochs", "data.shards.num_shards": "N (experts)",
              "aggregator.optimizer.lr": "AME learning rate", "data.shards.alpha": "Dirichlet α"}


@dataclass(frozen=True)
class Stat:
    """A metric over runs: mean, sample std (None for one run) and the run count."""

    mean: float
    std: float | None
    n: int
    half: float | None = None  # the 95 % CI's half-width when not Student t over n runs (see nested)

    @classmethod
    def of(cls, values: list) -> "Stat | None":
        v = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if not v:
            return None
        return cls(statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))

    @classmethod
    def nested(cls, groups: list[list]) -> "Stat | None":
        """Runs grouped by a fixed factor (e.g. one group per base): the mean of the group means,
        the pooled within-group std, and the t interval of that mean, whose variance is
        s_w² Σ_g 1/n_g / G² with n − G degrees of freedom. One group: :meth:`of`."""
        gs = [[float(x) for x in g if isinstance(x, (int, float)) and not isinstance(x, bool)] for g in groups]
        gs = [g for g in gs if g]
        if len(gs) <= 1:
            return cls.of(gs[0]) if gs else None
        n, df = sum(map(len, gs)), sum(map(len, gs)) - len(gs)
        mean = statistics.mean(statistics.mean(g) for g in gs)
        if df < 1:
            return cls(mean, None, n)
        sw = math.sqrt(sum((x - statistics.mean(g)) ** 2 for g in gs for x in g) / df)
        from scipy.stats import t

        se = sw * math.sqrt(sum(1 / len(g) for g in gs)) / len(gs)
        return cls(mean, sw, n, float(t.ppf(0.975, df)) * se)

    def ci95(self) -> float | None:
        """Half-width of the 95 % confidence interval of the mean (Student t), None for one run."""
        if self.half is not None:
            return self.half
        if self.std is None or self.n < 2:
            return None
        from scipy.stats import t

        return float(t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)


@dataclass
class Row:
    setting: str  # the runs' shared overrides ("" = the defaults)
    label: str  # what the row is called in tables and figures
    aggregator: str | None = None  # None for the reference rows (base, experts, ensemble, soup)
    variant: str = ""  # the aggregator.* overrides
    stats: dict[str, Stat] = field(default_factory=dict)
    environments: list[dict] = field(default_factory=list)  # where its setting's numbers came from (environments())
    bases: int = 1  # independently trained bases (FACTOR) its runs come from
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)  # expert set -> its paired Δs (per_set())
    set_bases: dict[str, str] = field(default_factory=dict)  # expert set -> its base (FACTOR), for contrast()

    @property
    def runs(self) -> int:
        return max((s.n for s in self.stats.values()), default=0)


def overrides(results_file: Path) -> list[str]:
    path = results_file.parent / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def load(dirs: list[Path]) -> list[dict]:
    """Every results.json under ``dirs``, with ``setting``, ``variant`` and ``overrides`` keys."""
    files = sorted({f for d in dirs for f in ([d] if d.is_file() else d.rglob("results.json"))},
                   key=lambda f: [int(p) if p.isdigit() else p for p in f.parts])  # job 2 before job 10
    if not files:
        raise AMEError(f"no results.json under {', '.join(map(str, dirs))}")
    out = []
    for f in files:
        r = readable(lambda p: _results(json.loads(p.read_text())), f, "a run's results.json")
        kept = [o for o in overrides(f) if not o.lstrip("+~").startswith(IGNORED)]
        r["setting"] = ", ".join(o for o in kept if not o.startswith("aggregator"))
        r["variant"] = ", ".join(o for o in kept if o.startswith("aggregator.") and "=" in o)
        r["overrides"] = dict(o.lstrip("+~").split("=", 1) for o in kept if "=" in o)
        given = dict(o.lstrip("+~").split("=", 1) for o in overrides(f) if "=" in o)
        r["factor"], r["label"] = given.get(FACTOR, ""), given.get(LABEL, "").strip("'\"")  # quoted: Hydra keeps the quotes
        if r["label"]:  # a named row: its aggregator.* values may differ from run to run (chosen per expert set)
            r["variant"] = ""
        out.append(r)
    return out


def _results(r) -> dict:
    """A results.json as this project writes it (its keys checked here, once)."""
    missing = {"aggregator", "metrics", "soup", "experts"} - set(r)
    if missing:
        raise KeyError(f"missing {sorted(missing)}")
    return r


def expert_set(r: dict) -> tuple:
    """Which experts a run aggregated (their files): runs sharing it share the reference rows."""
    return tuple(e["path"] for e in r["experts"])


def aggregator_label(name: str, variant: str = "") -> str:
    """``AME-Adam``, ``AME-Adam (lr 0.01)``: readable, the variant's overrides in words."""
    return NAMES.get(name, name) + (f" ({pretty_setting(variant)})" if variant else "")


def _stats(ms: list[dict]) -> dict[str, Stat]:
    keys = dict.fromkeys(k for m in ms for k in m)
    return {k: s for k in keys if (s := Stat.of([m.get(k) for m in ms])) is not None}


def _setting_rows(setting: str, results: list[dict]) -> list[Row]:
    rows = _rows(setting, results)
    envs = environments(results)
    bases = len({r.get("factor", "") for r in results})
    for row in rows:
        row.environments, row.bases = envs, bases
    return rows


def _rows(setting: str, results: list[dict]) -> list[Row]:
    by_set = list({expert_set(r): r for r in results}.values())
    # (metrics, the same expert set's run) per reference network; the run gives its soup, base and factor
    refs: list[tuple[str, list[tuple[dict, dict]]]] = []
    if any(r.get("base") for r in by_set):
        refs.append(("base (warm start)", [(_base(r), r) for r in by_set if r.get("base")]))
    refs.append(("experts (mean)", [(_experts_mean(r["experts"]), r) for r in by_set]))
    refs.append(("experts (best ID)", [(max(r["experts"], key=lambda e: e["id/acc"]), r) for r in by_set]))
    if all(r.get("ensemble") for r in by_set):
        refs.append(("output ensemble (N networks)", [(r["ensemble"], r) for r in by_set]))
    refs.append(("soup", [(r["soup"], r) for r in by_set]))
    names, rows = set_names(results), []
    for label, pairs in refs:
        against = {"soup": label != "soup", "base": not label.startswith("base")}  # not itself
        rows.append(Row(setting, label, stats=_stats([m for m, _ in pairs]) | _paired(pairs, **against),
                        per_set=per_set(pairs, names, **against)))
    kind = lambda r: (r["aggregator"], r["variant"], bool(r.get("tuned_on_validation")), r.get("label", ""))  # noqa: E731
    found = list(dict.fromkeys(kind(r) for r in results))
    rank = {name: i for i, name in enumerate(ORDER)}
    for name, variant, tuned, named in sorted(found, key=lambda nv: rank.get(nv[0], len(ORDER))):  # stable: run order
        runs = [r for r in results if kind(r) == (name, variant, tuned, named)]
        ms = [r["metrics"] for r in runs]
        label = named or aggregator_label(name, variant)
        if tuned and "validation" not in label:  # its hyperparameters were chosen on the validation split
            label = label[:-1] + ", tuned on validation)" if label.endswith(")") else label + " (tuned on validation)"
        if name == "ensemble" and not variant and not named and any(r.label == "output ensemble (N networks)" for r in rows) \
                and all(r["metrics"].get("id/acc") == r["ensemble"].get("id/acc") for r in runs):
            continue  # the output ensemble's reference row already
        if name == "soup" and not variant and not named:
            if all(r["metrics"].get("id/acc") == r["soup"].get("id/acc") for r in runs):
                soup = next(r for r in rows if r.label == "soup")  # the soup row already: add its distances
                soup.stats.update(_distances(runs))
                continue
            label = "soup, as run (e.g. bn_reset)"  # not the reference soup's network: a row of its own
        pairs = [(r["metrics"], r) for r in runs]
        rows.append(Row(setting, label, name, variant, _stats(ms) | _distances(runs) | _paired(pairs),
                        per_set=per_set(pairs, names)))
    bases = {names[expert_set(r)]: r.get("factor", "") for r in results}
    for row in rows:
        row.set_bases = bases
    return rows


def _distances(runs: list[dict]) -> dict[str, Stat]:
    """The distances moved (``dist/…``), like the paired Δs a :meth:`Stat.nested` over the runs grouped
    by base: with several bases their interval comes from the within-base spread."""
    keys = dict.fromkeys(k for r in runs for k in r["metrics"] if k.startswith("dist/"))
    return {k: s for k in keys if (s := _by_base((r, r["metrics"].get(k)) for r in runs)) is not None}


def _by_base(values) -> Stat | None:
    """:meth:`Stat.nested` of ``(run, value)`` pairs, the values grouped by their run's base (:data:`FACTOR`)."""
    groups: dict[str, list] = {}
    for r, v in values:
        groups.setdefault(r.get("factor", ""), []).append(v)
    return Stat.nested(list(groups.values()))


# -- where the numbers came from --------------------------------------------------------------
# the fields of a provenance block (ame/provenance.py) that describe an environment: the code, the
# libraries, the machine (not run_id, started and host, which name one run)
ENVIRONMENT = ("version", "commit", "dirty", "diff_sha256", "git_problem", "code_sha256", "python", "torch", "torchvision",
               "numpy", "timm", "device", "threads", "deterministic")
COMMIT_FIELDS = ("commit", "dirty", "diff_sha256", "git_problem")  # where the code came from, not what it was
VERSIONS = {"version": "ame", "python": "Python", "torch": "torch", "torchvision": "torchvision", "numpy": "numpy",
            "timm": "timm"}
ROLES = ("runs", "experts", "base", "reference metrics")  # what an environment made


def environments(results: list[dict]) -> list[dict]:
    """The distinct environments that made the numbers of ``results``, in the order first seen:
    ``{"environment": its fields (None: not recorded), "roles": [...]}``, the roles being ``runs``
    (the runs themselves), and ``experts``, ``base``, ``reference metrics`` (what they reused from
    the cache, made by another run). Experts handed in as files have no role: they are inputs.
    A run from a commit without uncommitted changes that recorded no ``code_sha256``, or recorded it
    by its first definition (the Python source alone), gets the commit's from git when this checkout
    has the commit (:func:`ame.provenance.code_sha256_at`), so that older results are grouped by the
    code they ran like newer ones. A recorded hash that is neither is kept (e.g. untracked files)."""
    found: dict[str, dict] = {}

    def add(p, role: str) -> None:
        env = {k: p.get(k) for k in ENVIRONMENT} if isinstance(p, dict) else None
        if env and env["commit"] and env["dirty"] is False and not env["git_problem"]:  # a clean commit
            recorded, now = env["code_sha256"], _code_at(env["commit"])
            if now and recorded != now and (recorded is None or recorded == _code_at(env["commit"], True)):
                env["code_sha256"] = now  # not recorded, or recorded by the first definition
        item = found.setdefault(json.dumps(env, sort_keys=True), {"environment": env, "roles": []})
        if role not in item["roles"]:
            item["roles"].append(role)

    for r in results:
        p = r.get("provenance")
        add(p, "runs")
        if not isinstance(p, dict):
            continue
        for made in p.get("experts_made_by") or []:  # null: experts from files
            add(made, "experts")
        if r.get("base"):  # a base row in the table
            add(p.get("base_made_by"), "base")
        add(p.get("reference_metrics_made_by"), "reference metrics")
        if "aggregate_metrics_made_by" in p:  # absent in results from before it was recorded
            add(p["aggregate_metrics_made_by"], "aggregate metrics")
    return list(found.values())


@functools.lru_cache(maxsize=None)
def _code_at(commit: str, first_definition: bool = False) -> str | None:
    from ame.provenance import code_sha256_at  # git, and torch (ame.merge, ame.provenance): only when asked

    return code_sha256_at(commit, first_definition)


def merge_environments(rows: list[Row]) -> list[dict]:
    """The environments of ``rows`` (e.g. one table's), each once, roles united. Environments that
    recorded the same code (``code_sha256``) and differ only in the commit it was run from (e.g.
    commits that add results) are one, its ``codes`` listing those commits."""
    found: dict[str, dict] = {}
    for row in rows:
        for item in row.environments:
            env = item["environment"]
            same = {k: v for k, v in env.items() if k not in COMMIT_FIELDS} if env and env.get("code_sha256") else env
            mine = found.setdefault(json.dumps(same, sort_keys=True), {"environment": env, "roles": [], "codes": []})
            mine["roles"] += [r for r in item["roles"] if r not in mine["roles"]]
            if env is not None and _code(env) not in mine["codes"]:
                mine["codes"].append(_code(env))
    return list(found.values())


def _code(env: dict) -> str:
    commit = env.get("commit")
    problem = env.get("git_problem")
    text = f"commit {commit[:12]}" if commit else f"commit unknown ({problem or 'not run from a git checkout'})"
    if commit and problem:  # the commit is known, its uncommitted changes are not
        text += f" (changes unknown: {problem})"
    if env.get("dirty"):
        text += f" + uncommitted changes (diff sha256 {str(env.get('diff_sha256'))[:12]})"
    return text


def environment_line(item: dict) -> str:
    """One environment in one line: commit; versions; device; threads: what it made."""
    roles = ", ".join(sorted(item["roles"], key=lambda r: ROLES.index(r) if r in ROLES else len(ROLES)))
    env = item["environment"]
    if env is None:
        return f"not recorded (made before results recorded their provenance): {roles}"
    versions = ", ".join(f"{name} {env[k]}" for k, name in VERSIONS.items() if env.get(k))
    d = env.get("device") if isinstance(env.get("device"), dict) else {}
    cores = f"{d.get('cores')} cores" + (f" ({d['cores_usable']} usable)" if d.get("cores_usable") not in
                                         (None, d.get("cores")) else "")
    device = (d.get("cpu") or "CPU unknown") + (f" ({d['cpu_capability']})" if d.get("cpu_capability") else "") \
        + f", {cores}"
    gpu = d.get("gpu")
    if isinstance(gpu, dict):
        device = f"{gpu.get('name')} (CUDA {gpu.get('cuda')}, driver {gpu.get('driver')}) on {device}"
    threads = env.get("threads")
    threads = f"{threads} thread{'' if threads == 1 else 's'}" + (", deterministic algorithms" if env.get("deterministic")
                                                                else "")
    codes = item.get("codes") or [_code(env)]
    code = codes[0] if len(codes) == 1 else f"{len(codes)} commits ({', '.join(codes)})"
    if env.get("code_sha256"):
        code += f", code sha256 {env['code_sha256'][:12]}"
    return f"{code}; {versions}; {device}; {threads}: {roles}"


def mismatches(envs: list[dict]) -> list[str]:
    """What makes numbers from ``envs`` hard to compare: other commits, other versions, or some
    recorded and some not. Other machines are not listed (their lines show them)."""
    known = [e["environment"] for e in envs if e["environment"] is not None]
    out = []
    hashed = {_code(e): e["code_sha256"] for e in known if e.get("code_sha256")}  # a commit (+ diff) → its code
    codes: dict[str, list[str]] = {}  # one entry per version of the code, whatever the commits it ran from
    for item in (e for e in envs if e["environment"] is not None):
        env = item["environment"]
        mine = codes.setdefault(env.get("code_sha256") or hashed.get(_code(env)) or _code(env), [])
        mine += [c for c in item.get("codes") or [_code(env)] if c not in mine]
    if len(codes) > 1:
        named = "; ".join(", ".join(commits) for commits in codes.values())
        out.append(f"numbers from {len(codes)} different versions of the code ({named})")
    for key, name in VERSIONS.items():
        values = list(dict.fromkeys(str(e.get(key)) for e in known))
        if len(values) > 1:
            out.append(f"numbers from different {name} versions ({', '.join(values)})")
    unknown = [r for e in envs if e["environment"] is None for r in e["roles"]]
    if known and unknown:
        out.append(f"some numbers record no provenance ({', '.join(dict.fromkeys(unknown))}: older results or "
                   "cache entries); cannot tell whether they match")
    return out


def _differences(pairs: list[tuple[dict, dict]], soup: bool = True, base: bool = True):
    """``(run, "vs_<ref>/<key>", network minus ref)`` for every pair ``(metrics, run)``, ``ref`` the
    soup of the same experts (with ``soup``) and their base (with ``base``), where both have the key."""
    for ref in [ref for ref, on in (("soup", soup), ("base", base)) if on]:
        for k in PAIRED:
            for m, r in pairs:
                if isinstance(m.get(k), float) and isinstance((r.get(ref) or {}).get(k), float):
                    yield r, f"vs_{ref}/{k}", m[k] - r[ref][k]


def _paired(pairs: list[tuple[dict, dict]], soup: bool = True, base: bool = True) -> dict[str, Stat]:
    """Paired differences, expert set by expert set: ``vs_soup/<key>`` (minus the soup of the same
    experts) and ``vs_base/<key>`` (minus their base), each a :meth:`Stat.nested` over the runs
    grouped by base (:data:`FACTOR`). Swings between expert sets that move both networks alike
    cancel here."""
    found: dict[str, list] = {}
    for r, key, d in _differences(pairs, soup, base):
        found.setdefault(key, []).append((r, d))
    return {key: s for key, values in found.items() if (s := _by_base(values)) is not None}


def set_name(r: dict) -> str:
    """An expert set in a few characters: ``b0 s3`` (base_seed 0, seed 3), ``s3`` with one base."""
    return " ".join(f"{p}{v}" for p, v in (("b", r.get("factor", "")), ("s", r.get("seed", ""))) if v != "") or "set"


def set_names(results: list[dict]) -> dict[tuple, str]:
    """Every expert set of ``results`` (:func:`expert_set`) → its :func:`set_name`, in base then seed
    order; a name two expert sets share is numbered (``s0``, ``s0 #2``). Made once per table, so
    every row's :func:`per_set` names the same set alike."""
    runs = sorted(results, key=lambda r: [value_order(_number(str(r.get(k, "")))) for k in ("factor", "seed")])
    names: dict[tuple, str] = {}
    for r in runs:
        if expert_set(r) not in names:
            name = set_name(r)
            taken = sum(n == name or n.startswith(f"{name} #") for n in names.values())
            names[expert_set(r)] = name if not taken else f"{name} #{taken + 1}"
    return names


def per_set(pairs: list[tuple[dict, dict]], names: dict[tuple, str], soup: bool = True,
            base: bool = True) -> dict[str, dict[str, float]]:
    """Each expert set's paired Δs (``vs_soup/…``, ``vs_base/…``: what :func:`_paired` pools), keyed
    by its name in ``names`` (:func:`set_names`) and in that order; an expert set run twice shows
    its mean."""
    found: dict[tuple, dict[str, list]] = {}
    for r, key, d in _differences(pairs, soup, base):
        found.setdefault(expert_set(r), {}).setdefault(key, []).append(d)
    return {names[key]: {k: statistics.mean(v) for k, v in found[key].items()} for key in names if key in found}


def contrast(a: Row, b: Row, key: str) -> Stat | None:
    """Row ``a`` minus row ``b``, expert set by expert set: the difference of their paired Δs ``key``
    (``vs_base/…`` or ``vs_soup/…``, whose reference cancels), over the expert sets both have, a
    :meth:`Stat.nested` by base like the paired Δs. From results trees only (:attr:`Row.per_set`)."""
    groups: dict[str, list] = {}
    for name, d in a.per_set.items():
        other = b.per_set.get(name, {})
        if key in d and key in other:
            groups.setdefault(a.set_bases.get(name, ""), []).append(d[key] - other[key])
    return Stat.nested(list(groups.values()))


def _experts_mean(experts: list[dict]) -> dict:
    """The experts' mean metrics; with the base's own-shard comparison, also the smallest gain and
    the share of experts that beat the base on their own shard."""
    m = {k: statistics.mean(e[k] for e in experts) for k in experts[0] if all(isinstance(e.get(k), float) for e in experts)}
    if "shard/own_gain" in m:
        m["shard/own_gain_min"] = min(e["shard/own_gain"] for e in experts)
        m["shard/beats_base"] = statistics.mean(float(e["shard/own_gain"] > 0) for e in experts)
    return m


def _base(r: dict) -> dict:
    """The base's metrics, with its accuracy on the experts' own shard mixes (their mean)."""
    own = [e["shard/base_own_acc"] for e in r["experts"] if "shard/base_own_acc" in e]
    return r["base"] | ({"shard/own_acc": statistics.mean(own)} if own and len(own) == len(r["experts"]) else {})


def summarize(results: list[dict]) -> list[Row]:
    """The rows of every setting, settings in the order first seen."""
    return [row for setting in dict.fromkeys(r["setting"] for r in results)
            for row in _setting_rows(setting, [r for r in results if r["setting"] == setting])]


def _old_label(label: str) -> tuple[str, str | None, str]:
    """A row label of an older make_tables CSV (``ame_adam (aggregate, aggregator.x=1)``) as
    (label, aggregator, variant); reference labels pass through."""
    if " (aggregate" not in label:
        return label, None, ""
    name, rest = label.split(" (aggregate", 1)
    variant = rest.rstrip(")").lstrip(", ")
    return aggregator_label(name, variant), name, variant


def summary_csv(rows: list[Row]) -> str:
    """The CSV that :func:`read_summary` reads back (``make_tables.py --out``): one line per
    (setting, row), mean, std and run count of every column, unrounded, and the setting's
    environments (JSON)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    paired = [c for c in columns(rows, PAIRED_COLUMNS) if c.key.startswith("vs_")]
    cols = columns(rows) + paired
    out.writerow(["setting", "network", "aggregator", "variant", "runs", "bases"]
                 + [f"{c.key}_{s}" for c in cols for s in ("mean", "std") + (("ci95",) if c in paired else ())]
                 + ["environments"])
    for r in rows:
        line = [r.setting, r.label, r.aggregator or "", r.variant, r.runs, r.bases]
        for c in cols:
            s = r.stats.get(c.key)
            line += [repr(s.mean) if s else "", repr(s.std) if s and s.std is not None else ""]
            if c in paired:
                line.append(repr(s.ci95()) if s and s.ci95() is not None else "")
        out.writerow(line + [json.dumps(r.environments, sort_keys=True) if r.environments else ""])
    return buf.getvalue()


def read_summary(path: Path) -> list[Row]:
    """The rows of a CSV written by ``make_tables.py --out`` (this version's or an older one)."""
    rows: list[Row] = []
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            legacy = line.get("aggregator") is None
            if not legacy:
                label, name, variant = line["network"], line["aggregator"] or None, line.get("variant", "")
            else:
                label, name, variant = _old_label(line["network"])
            n = int(line["runs"])
            stats = {}
            for c in COLUMNS + PAIRED_COLUMNS:
                mean, std, half = (line.get(f"{c.key}_{s}") for s in ("mean", "std", "ci95"))
                if mean:
                    stats[c.key] = Stat(float(mean), float(std) if std else None, n, float(half) if half else None)
            if label == "soup" and name is None:  # older CSVs paired the soup with itself (0 ± 0)
                stats = {k: v for k, v in stats.items() if not k.startswith("vs_soup/")}
            row = Row(line["setting"], label, name, variant, stats, json.loads(line.get("environments") or "[]"),
                      int(line.get("bases") or 1))  # older CSVs: one base
            if legacy and name == "soup" and not variant:  # older tables repeated the soup as an aggregate row
                soup = next((r for r in rows if r.setting == row.setting and r.label == "soup"), None)
                if soup is not None:
                    soup.stats.update({k: s for k, s in stats.items() if k.startswith("dist/")})
                    continue
            rows.append(row)
    return rows


def is_summary(paths: list[Path]) -> bool:
    """Whether ``paths`` name a summary CSV (one path ending in .csv) rather than results trees."""
    return len(paths) == 1 and paths[0].suffix == ".csv"


def read(paths: list[Path]) -> list[Row]:
    """Rows from results trees, or from a summary CSV (:func:`is_summary`)."""
    if is_summary(paths):
        rows = readable(read_summary, paths[0], "a summary CSV written by make_tables.py --out")
    else:
        rows = summarize(load(paths))
    if not rows:
        raise AMEError(f"no rows in {', '.join(map(str, paths))}")
    return rows


def readable(reader, path: Path, what: str, *args):
    """``reader(path, *args)``, or one line naming the file when it is missing or not ``what``."""
    try:
        return reader(path, *args)
    except (OSError, KeyError, ValueError, IndexError, TypeError) as e:
        raise AMEError(f"{path}: cannot read it as {what} ({type(e).__name__}: {e})") from None


def settings(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.setting for r in rows))


def columns(rows: list[Row], among: list[Column] = COLUMNS) -> list[Column]:
    """The columns some row has, in ``among``'s order (:data:`COLUMNS`, or :data:`PAIRED_COLUMNS`)."""
    return [c for c in among if any(c.key in r.stats for r in rows)]


def spread_label(rows: list[Row], spread: str = "std") -> str:
    """What ``±`` means here: ``mean ± std over 3 seeds`` (or ``one seed``; runs on several bases:
    ``over 4 expert sets on 2 bases``); ``spread="ci"``: the half-width of the 95 % confidence
    interval."""
    counts = sorted({r.runs for r in rows if r.runs})
    bases = max((r.bases for r in rows), default=1)
    what = "mean ± std" if spread == "std" else "mean ± half-width of the 95 % CI (Student t)"
    if counts == [1] or not counts:
        return "one seed"
    unit = "seeds" if bases == 1 else "expert sets"
    count = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    where = "" if bases == 1 else f" on {bases} bases"
    more = "" if len(counts) == 1 else " (the CSV's runs column gives each row's count)"
    return f"{what} over {count} {unit}{where}{more}"


def cell(stat: Stat | None, column: Column, digits: int = 2, spread: str = "std") -> str:
    """``mean ± std``, or with ``spread="ci"`` ``mean ± half-width of the 95 % CI``."""
    if stat is None:
        return ""
    scale = 100 if column.percent else 1
    width = stat.std if spread == "std" else stat.ci95()
    mean = f"{scale * stat.mean:.{digits}f}"
    mean = mean[1:] if mean.startswith("-") and float(mean) == 0 else mean  # -0.00: a mean that rounds to 0
    return mean if width is None else f"{mean} ± {scale * width:.{digits}f}"


def pretty_setting(setting: str, default: str = "default settings") -> str:
    """``data/shards=dirichlet, data.shards.alpha=0.1`` → ``Dirichlet shards, α = 0.1``."""
    if not setting:
        return default
    words = []
    for part in setting.split(", "):
        key, _, value = part.partition("=")
        value = _VALUE_WORDS.get(key, {}).get(value, value)
        words.append(_SETTING_WORDS[key].format(value) if key in _SETTING_WORDS else f"{key.split('.')[-1]} = {value}")
    return ", ".join(words)


def axis_label(key: str) -> str:
    """An override or a metric key in words, for an axis."""
    if key in BY_KEY:
        return BY_KEY[key].long
    return AXIS_WORDS.get(key, key.split(".")[-1].replace("_", " "))


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def value_order(v) -> tuple:
    """Numbers in numeric order, then strings."""
    return (isinstance(v, str), v)


def series(results: list[dict], x: str, line: str, metric: str, name=None) -> dict:
    """``{panel (aggregator): {(line value, variant): [(x value, Stat over seeds)]}}``, sorted.
    Runs must differ only in ``x``, ``line``, the aggregator and the seed: anything else (another
    dataset, model, init, ...) is refused rather than averaged in. ``name(r)``: the panel of a run
    (default: its aggregator)."""
    acc: dict = {}
    rest = set()
    for r in results:
        o = r["overrides"]
        if x not in o or line not in o or not isinstance(r["metrics"].get(metric), (int, float)):
            continue
        rest.add(", ".join(f"{k}={v}" for k, v in o.items() if k not in (x, line) and not k.startswith("aggregator")))
        if len(rest) > 1:
            raise AMEError(f"runs from several settings ({' | '.join(sorted(rest)) or 'defaults'}); plot one "
                             "setting's directory at a time")
        variant = ", ".join(f"{k}={v}" for k, v in o.items() if k.startswith("aggregator.") and k not in (x, line))
        panel = name(r) if name else r["aggregator"]
        acc.setdefault(panel, {}).setdefault((_number(o[line]), variant), {}).setdefault(
            _number(o[x]), []).append(r["metrics"][metric])
    return {panel: {key: [(xv, Stat.of(v)) for xv, v in sorted(pts.items(), key=lambda kv: value_order(kv[0]))]
                    for key, pts in sorted(lines.items(), key=lambda kv: (value_order(kv[0][0]), kv[0][1]))}
            for panel, lines in acc.items()}


def references(results: list[dict], x: str, line: str, metric: str) -> dict:
    """:func:`series` of the networks every run reports beside its aggregate, once per expert set:
    ``experts (mean)``, ``output ensemble``, ``base (warm start)``."""
    pick = {"experts (mean)": lambda r: statistics.mean(e[metric] for e in r["experts"]),
            "output ensemble": lambda r: (r.get("ensemble") or {}).get(metric),
            "base (warm start)": lambda r: (r.get("base") or {}).get(metric)}
    sets = list({expert_set(r): r for r in results if x in r["overrides"] and line in r["overrides"]}.values())
    out = {}
    for panel, f in pick.items():
        runs = [dict(r, aggregator=panel, metrics={metric: f(r)},
                     overrides={k: v for k, v in r["overrides"].items() if not k.startswith("aggregator")})
                for r in sets]
        out.update(series(runs, x, line, metric))
    return out


def value_text(v) -> str:
    """An override's value as a label: floats in their shortest form (0.1, 1e-05)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def series_table(data: dict, panels: list[str], x: str, line: str, metric: str) -> str:
    """The plotted numbers of a fig1 (:func:`series`, :func:`references`) as a Markdown table, one
    row per line, one column per x value, that :func:`read_series_table` reads back; the caption
    gives the seed counts."""
    xs = sorted({p[0] for lines in data.values() for pts in lines.values() for p in pts}, key=value_order)
    xn, ln = x.split(".")[-1], line.split(".")[-1]
    out = [f"| aggregator | setting | {ln} | " + " | ".join(f"{xn}={value_text(v)}" for v in xs) + " |",
           "|---|---|---:|" + "---:|" * len(xs)]
    seeds = set()
    for panel in panels:
        for (level, variant), pts in sorted(data[panel].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            by_x = {p[0]: p[1] for p in pts}
            seeds |= {s.n for s in by_x.values()}
            cells = [("" if v not in by_x else f"{100 * by_x[v].mean:.2f}"
                      + (f" ± {100 * by_x[v].std:.2f}" if by_x[v].std is not None else "")) for v in xs]
            out.append(f"| {panel} | {variant} | {value_text(level)} | " + " | ".join(cells) + " |")
    spread = "mean ± std over " + "/".join(map(str, sorted(seeds))) + " seeds" if seeds != {1} else "one seed"
    return "\n".join(out) + f"\n\n{metric} in %, {spread}.\n"


def read_series_table(path: Path, x: str, line: str) -> tuple[dict, dict]:
    """The series of a Markdown table that :func:`series_table` wrote (``make_figures.py fig1``, beside its PNG)
    (``| aggregator | setting | <line> | <x>=1 | ...``, cells ``mean`` or ``mean ± std``), as
    (aggregators, references) for plotting again. The run count per point is not in the table:
    cells with a std count as 2+ seeds (``n`` from the caption), others as one."""
    text = Path(path).read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    xs = [_number(h.split("=", 1)[1]) for h in head[3:]]
    caption = text.split("over ")[-1].split(" seeds")[0] if "seeds" in text else "1"
    n = int(caption.split("/")[-1]) if caption.split("/")[-1].isdigit() else 1
    data: dict = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        panel, variant, level = cells[0], cells[1], _number(cells[2])
        pts = []
        for xv, c in zip(xs, cells[3:]):
            if c:
                mean, _, std = c.partition(" ± ")
                pts.append((xv, Stat(float(mean) / 100, float(std) / 100 if std else None, n if std else 1)))
        data.setdefault(panel, {})[(level, variant)] = pts
    refs = {p: v for p, v in data.items() if p in ("experts (mean)", "output ensemble", "base (warm start)")}
    return {p: v for p, v in data.items() if p not in refs}, refs
