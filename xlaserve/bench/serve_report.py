"""The serving benchmark's report: one line per run, a markdown table, and latency
percentiles per load plotted (PNG)."""

from __future__ import annotations

from pathlib import Path

from xlaserve.bench.common import PERCENTILES


def scenario_label(run: dict) -> str:
    if run["concurrency"]:
        return f"c={run['concurrency']}"
    return "inf" if run["request_rate"] == "inf" else f"{run['request_rate']:g}/s"


def ppp(d: dict | None) -> str:
    return "/".join(f"{d[f'p{q}']:.1f}" for q in PERCENTILES) if d else "-"


def one_line(run: dict) -> str:
    host = run["engine"].get("host_overhead_share")
    return (f"{run['protocol']:>4} {scenario_label(run):>6}: {run['completed']}/"
            f"{run['num_requests']} ok, {run['request_throughput']:.2f} req/s, "
            f"{run['output_token_throughput']:.1f} tok/s, TTFT {ppp(run['ttft_ms'])} ms, "
            f"TPOT {ppp(run['tpot_ms'])} ms"
            + (f", host share {100 * host:.1f}%" if host is not None else ""))  # fmt: skip


def markdown(r: dict) -> str:
    w = r["workload"]
    lines = [f"# Serving: {r['model']} on {r['device']}, {r['date']}", "",
             f"{r['setup']}. {w['num_prompts']} requests per run, {w['prompt_kind']} prompts of "
             f"{w['input_len']} tokens, exactly {w['output_len']} output tokens each (greedy, "
             "ignore_eos). Latencies p50/p90/p99 in ms.", "",
             "| protocol | load | ok | req/s | out tok/s | TTFT | TPOT | ITL | E2E | mean step ms "
             "| host share | idle share | CPU cores busy: all / this process |",
             "|---" * 13 + "|"]  # fmt: skip
    for run in r["runs"]:
        e = run["engine"]
        cells = [run["protocol"], scenario_label(run), f"{run['completed']}/{run['num_requests']}",
                 f"{run['request_throughput']:.2f}", f"{run['output_token_throughput']:.1f}",
                 *(ppp(run[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
                 f"{e['mean_step_ms']:.1f}" if e.get("mean_step_ms") else "-"]  # fmt: skip
        for share in (e.get("host_overhead_share"), e.get("loop", {}).get("idle_share")):
            cells.append("-" if share is None else f"{100 * share:.1f}%")
        cpu = run.get("cpu")
        cells.append(f"{cpu['machine_busy_cores']:.2f} / {cpu['this_process_cores']:.2f} of "
                     f"{cpu['cores']}" if cpu else "-")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", r["notes"]]) + "\n"


def plot(r: dict, path: Path) -> None:
    """Latency percentiles per load: rates joined by lines, fixed concurrencies as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {50: "tab:blue", 90: "tab:orange", 99: "tab:red"}
    styles = {"grpc": ("-", "o"), "http": ("--", "s")}
    labels = list(dict.fromkeys(scenario_label(run) for run in r["runs"]))
    titles = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "inter-token latency",
              "e2e_ms": "end-to-end latency"}  # fmt: skip
    for ax, (key, title) in zip(axes.flat, titles.items(), strict=True):
        for protocol in dict.fromkeys(run["protocol"] for run in r["runs"]):
            line, marker = styles.get(protocol, ("-", "x"))
            runs = [run for run in r["runs"] if run["protocol"] == protocol and run[key]]
            rated = [x for x in runs if not x["concurrency"]]
            fixed = [x for x in runs if x["concurrency"]]
            for q in PERCENTILES:
                label = f"{protocol} p{q}"
                for group, ls in ((rated, line), (fixed, "none")):
                    if group:
                        xs = [labels.index(scenario_label(x)) for x in group]
                        ax.plot(xs, [x[key][f"p{q}"] for x in group], linestyle=ls,
                                marker=marker, color=colors[q], label=label)  # fmt: skip
                        label = None
        ax.set(title=title, xlabel="request rate (req/s) or concurrency (c=N)", ylabel="ms",
               yscale="log", xticks=range(len(labels)), xticklabels=labels)  # fmt: skip
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{r['model']} serving on {r['device']}, {r['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
