"""`crosstrim bench elastic`'s verdict against issue 29's targets, with paired differences (the same requests under
each setting) and their standard errors, and its figure."""

import math
import statistics

ELASTIC = "elastic"


def good(outcome: dict | None, slo: float) -> bool:
    """Answered correctly within the TTFT SLO (a refused request: no)."""
    return bool(outcome and outcome["correct"] and outcome["ttft"] <= slo)


def paired(a: list[dict | None], b: list[dict | None], score, both_answered: bool) -> tuple[float, float, int]:
    """Mean of score(a's outcome) minus score(b's) over the requests (those both answered, or all), its standard
    error, and how many requests it is over."""
    pairs = [(x, y) for x, y in zip(a, b) if not both_answered or (x and y)]
    d = [float(score(x)) - float(score(y)) for x, y in pairs]
    if len(d) < 2:
        return 0.0, float("nan"), len(d)
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def coincides(e: dict) -> str | None:
    """Which fixed setting elastic was at this load, request for request: every one admitted at its ceiling (1.0,
    untrimmed) and none shed, or every one admitted at its floor (the fixed floor's `target`)."""
    if e["at_ceiling"] == 1.0 and e["shed"] == 0:
        return "untrimmed"
    if e["at_floor"] == 1.0:
        return "fixed floor"
    return None


def verdict(results: list[dict], outcomes: dict, windows: dict, slo: float) -> dict:
    """The issue's targets at a TTFT SLO: within 1 point of the best fixed accuracy at the lowest load, within 5% of
    the best fixed goodput at the highest, not dominated (worse on both) by any fixed setting at any load, and better
    than each fixed setting on at least one of the two at every load; each paired difference with its standard
    error; where elastic was, request for request, one of the fixed settings."""
    loads = sorted({r["load"] for r in results})
    at = {(r["setting"], r["load"]): {**r, "goodput": r["goodput_at_slo"][str(slo)]} for r in results}
    fixed = [s for s in dict.fromkeys(r["setting"] for r in results) if s != ELASTIC]
    low, high = loads[0], loads[-1]
    best_acc = max(at[s, low]["accuracy"] for s in fixed)
    best_good = max(at[s, high]["goodput"] for s in fixed)
    pareto, beats, same, diffs = {}, {}, {}, {}
    for load in loads:
        e = at[ELASTIC, load]
        pareto[str(load)] = not any(at[s, load]["accuracy"] > e["accuracy"] and at[s, load]["goodput"] > e["goodput"]
                                    for s in fixed)
        beats[str(load)] = all(e["accuracy"] > at[s, load]["accuracy"] or e["goodput"] > at[s, load]["goodput"]
                               for s in fixed)
        same[str(load)] = coincides(e)
        diffs[str(load)] = {}
        for s in fixed:
            acc, acc_se, n = paired(outcomes[ELASTIC, load], outcomes[s, load], lambda o: o["correct"], True)
            gd, gd_se, _ = paired(outcomes[ELASTIC, load], outcomes[s, load], lambda o: good(o, slo), False)
            scale = len(outcomes[s, load]) / windows[load]  # a request's share of goodput, per second
            diffs[str(load)][s] = {"accuracy": round(acc, 4), "accuracy_se": round(acc_se, 4), "over": n,
                                   "goodput": round(gd * scale, 3), "goodput_se": round(gd_se * scale, 3)}
    return {"slo_ttft_s": slo, "accuracy_gap_at_lowest_load": round(best_acc - at[ELASTIC, low]["accuracy"], 4),
            "accuracy_target_met": best_acc - at[ELASTIC, low]["accuracy"] <= 0.01,
            "goodput_ratio_at_highest_load": round(at[ELASTIC, high]["goodput"] / best_good, 4) if best_good else None,
            "goodput_target_met": bool(best_good) and at[ELASTIC, high]["goodput"] >= 0.95 * best_good,
            "not_dominated_at_load": pareto, "beats_each_fixed_on_one_at_load": beats,
            "coincides_with_at_load": same, "elastic_minus_fixed": diffs}


def plot(results: list[dict], path: str, slo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_good) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["setting"] for r in results):
        rows = sorted((r for r in results if r["setting"] == name), key=lambda r: r["load"])
        loads = [r["load"] for r in rows]
        # one standard error of the answered requests' accuracy: at high load they are a few hundred
        err = [math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / max(r["answered"], 1)) for r in rows]
        ax_acc.errorbar(loads, [r["accuracy"] for r in rows], yerr=err, marker="o", capsize=3, label=name)
        ax_good.plot(loads, [r["goodput_at_slo"][str(slo)] for r in rows], marker="o", label=name)
    for ax, label in ((ax_acc, "accuracy (answered)"), (ax_good, f"goodput (correct, TTFT <= {slo:g} s; req/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered load (x untrimmed capacity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
