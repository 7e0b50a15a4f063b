"""The one report of .ci/gpu-check: $OUT/gpu-check.json from what the phases left in $OUT.

    python .ci/gpu_report.py OUT DRY_RUN(0|1) SECONDS

Sections: env (GPU, driver, python, torch, CUDA, Triton, tools), build (mode, backends), phases
(rc, seconds, limit), smoke (op x backend), tests (counts, failures with their message, skip
reasons), bench (limits, every ratio, rows), aot (per-kernel registers / spills / shared memory /
compile seconds, failures), cuda_kernels (ptxas registers / spills of fusedlm._cuda, from the build
log), and `problems`: everything that failed or did not run.
"""
import collections
import importlib.metadata
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _env(out):
    env = {"python": platform.python_version(), "executable": sys.executable,
           **{name: _version(name) for name in ("torch", "triton", "pytest", "pytest-xdist", "scikit-build-core",
                                                 "pybind11", "cmake", "numpy", "bitsandbytes", "flash-attn", "peft",
                                                 "transformers")}}
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                          "count": torch.cuda.device_count()}
    except ImportError:
        env["torch"] = None
    try:
        with open(os.path.join(out, "logs", "nvidia-smi.txt")) as f:
            env["nvidia_smi"] = f.read()[-4000:]
    except OSError:
        pass
    return env


def _tests(out):
    try:
        root = ET.parse(os.path.join(out, "tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = collections.Counter()
    failures, skips = [], collections.Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case]
        if "failure" in kinds or "error" in kinds:
            counts["failed"] += 1
            child = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append({"test": name, "message": (child.get("message") or "")[:500],
                             "detail": (child.text or "")[-1500:]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skips[(case.find("skipped").get("message") or "")[:200]] += 1
        else:
            counts["passed"] += 1
        counts["seconds"] += float(case.get("time") or 0)
    return {**counts, "failures": failures, "skip_reasons": dict(skips)}


def _aot(out):
    aot = _load(os.path.join(out, "aot.json"))
    if aot is None:
        return None
    per_kernel = collections.defaultdict(lambda: {"variants": 0, "max_registers": 0, "max_spill_bytes": 0,
                                                  "max_shared_bytes": 0, "compile_seconds": 0.0})
    for b in aot["builds"]:
        if b["error"]:
            continue
        k = per_kernel[b["kernel"]]
        k["variants"] += 1
        k["max_registers"] = max(k["max_registers"], b["registers"] or 0)
        k["max_spill_bytes"] = max(k["max_spill_bytes"], b["spill_stores"] or 0)
        k["max_shared_bytes"] = max(k["max_shared_bytes"], b["shared"] or 0)
        k["compile_seconds"] = round(k["compile_seconds"] + b["seconds"], 2)
    return {"triton": aot["triton"], "compiled": aot["compiled"], "failed": aot["failed"],
            "compile_seconds": aot["compile_seconds"], "per_kernel": dict(per_kernel),
            "variants": [{k: b[k] for k in ("case", "kernel", "registers", "spill_stores", "stack", "shared", "seconds",
                                            "num_warps", "num_stages", "constants", "error")} for b in aot["builds"]]}


def _cuda_kernels(out):
    """Registers and spill bytes of each fusedlm._cuda kernel, from ptxas -v in the build log."""
    import re

    kernels = {}
    for name in ("build-pip.log", "build-cmake.log"):
        try:
            with open(os.path.join(out, "logs", name)) as f:
                log = f.read()
        except OSError:
            continue
        current = None
        for line in log.splitlines():
            if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line):
                current = f"{m.group(1)} ({m.group(2)})"
            elif current and (m := re.search(r"(\d+) bytes spill stores", line)):
                kernels.setdefault(current, {})["spill_stores"] = int(m.group(1))
            elif current and (m := re.search(r"Used (\d+) registers", line)):
                kernels.setdefault(current, {})["registers"] = int(m.group(1))
    return kernels or None


def main(out, dry, seconds):
    phases = {}
    try:
        with open(os.path.join(out, "logs", "phases.tsv")) as f:
            for line in f:
                name, rc, secs, limit = line.rstrip("\n").split("\t")
                phases[name] = {"rc": rc, "seconds": int(secs), "limit_s": limit}
    except OSError:
        pass
    try:
        with open(os.path.join(out, "logs", "fusedlm.txt")) as f:
            fusedlm_line = f.read().strip()
    except OSError:
        fusedlm_line = None
    report = {
        "dry_run": dry == "1",
        "seconds": int(seconds),
        "env": _env(out),
        "build": {"mode": phases.get("build_mode", {}).get("rc"), "fusedlm": fusedlm_line},
        "phases": phases,
        "smoke": _load(os.path.join(out, "smoke.json")),
        "tests": _tests(out),
        "bench": _load(os.path.join(out, "bench.json")),
        "aot": _aot(out),
        "cuda_kernels": _cuda_kernels(out),
    }
    problems = []
    for name, p in phases.items():
        if name != "build_mode" and p["rc"] not in ("0",) and not (name == "build-pip" and report["build"]["mode"] != "pip"):
            problems.append(f"phase {name}: rc {p['rc']} after {p['seconds']} s (124 = its time limit)")
    for r in (report["smoke"] or {}).get("results", []):
        if r["ok"] is False:
            problems.append(f"smoke {r['op']} [{r['backend']}]: {r.get('error') or r.get('max_rel_err')}")
    for f in (report["tests"] or {}).get("failures", []):
        problems.append(f"test {f['test']}: {f['message'][:200]}")
    for f in (report["aot"] or {}).get("failed", []):
        problems.append(f"aot {f['case']} / {f['kernel']}: {(f['error'] or '')[-200:]}")
    for suite, e in ((report["bench"] or {}).get("errors") or {}).items():
        problems.append(f"bench {suite}: {e[:200]}")
    for missing in ("smoke", "tests", "bench", "aot"):
        if report[missing] is None:
            problems.append(f"{missing}: no result")
    report["problems"] = problems
    path = os.path.join(out, "gpu-check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(path + ".tmp", path)

    gpu = report["env"].get("gpu") or {}
    print(f"\n==== gpu-check {'DRY RUN ' if report['dry_run'] else ''}— {gpu.get('name', 'no GPU')}, torch "
          f"{report['env']['torch']} (CUDA {report['env'].get('torch_cuda')}), triton {report['env']['triton']}, "
          f"{report['seconds']} s")
    print(f"build: {report['build']['mode']} — {report['build']['fusedlm']}")
    t = report["tests"] or {}
    print(f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped")
    smoke = (report["smoke"] or {}).get("results", [])
    print("smoke: " + ", ".join(f"{r['op']}[{r['backend']}]={'ok' if r['ok'] else 'n/a' if r['ok'] is None else 'BAD'}"
                                for r in smoke))
    if report["aot"]:
        a = report["aot"]
        print(f"aot (triton {a['triton']}): {a['compiled']} variants, {len(a['failed'])} failed, "
              f"{a['compile_seconds']} s of compilation")
        for name, k in sorted(a["per_kernel"].items()):
            print(f"  {name:22s} {k['variants']:3d} variants, <= {k['max_registers']} regs, <= {k['max_spill_bytes']} B spill")
    for name, k in sorted((report["cuda_kernels"] or {}).items()):
        print(f"  cuda {name[:70]:70s} {k.get('registers')} regs, {k.get('spill_stores')} B spill")
    for key, ratio in ((report["bench"] or {}).get("ratios") or {}).items():
        print(f"  {ratio:7.2f}x  {key}")
    print(f"problems: {len(problems)}")
    for p in problems:
        print(f"  - {p}")
    print(f"report: {path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
