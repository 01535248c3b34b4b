"""``raycyto sweep`` / ``raycyto run`` on unusable inputs: exit code 2, one ``error:`` line that
names the problem, no traceback -- also when the error is raised inside a Ray actor (a Ray Data
actor pool's ``__init__``: Ray keeps only the text of it).

Every case is a real ``raycyto`` process. They run at once against one ``ray start --head`` of
this module (its own temp dir and ports), so Ray starts once for all of them; its workers have
an empty ``TORCH_HOME``, so a hub backbone's weights are missing there (efficientnet_lite0's
ship in a package and are always found).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import encode_image, free_ports, stop_head, tiny_sweep_config

BIN = Path(sys.executable).parent
MISSING_WEIGHTS = "resnet18-f37072fd.pth not found"

#: case -> (what the last stderr line must name, what else stderr must hold)
EXPECTED = {
    "all_unreadable": ("no readable images (8 bad files)", "truncated"),
    "too_few_patients": ("class 'abnormal' has only 2 group(s)", None),
    "manifest_missing_files": ("no readable images (8 bad files)", "missing"),
    "run_weights_in_ray_actor": (MISSING_WEIGHTS, "MapBatches(FeatureExtractor)"),
}


def _inputs(root: Path) -> dict[str, list[str]]:
    """Write the unusable inputs; return each case's command line."""
    rng = np.random.default_rng(0)

    def png(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), ".png"))

    for label in ("normal", "abnormal"):  # a folder whose every image is unreadable
        for i in range(4):
            path = root / "unreadable" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows = ["path,label,group"]  # one image per patient; too few abnormal patients for 2 folds
    for label, n in (("normal", 6), ("abnormal", 2)):
        for i in range(n):
            png(root / "few" / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label},{label}{i}")
    (root / "few" / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "gone").mkdir()  # a manifest whose files do not exist
    (root / "gone" / "list.csv").write_text("path,label,group\n" + "".join(
        f"img/{label}{i}.png,{label},{label}{i}\n" for label in ("normal", "abnormal") for i in range(4)))

    sweep_cfg = tiny_sweep_config("synthetic", "err", size=32)
    sweep_cfg["resources"]["feature_actors"] = 1
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep_cfg))
    run_cfg = {**sweep_cfg, "data": {**sweep_cfg["data"], "source": "synthetic", "synthetic": {
        "task": "karyogram", "patients": 8, "per_patient": 1, "seed": 0, "size": 32}}}
    (root / "run.yaml").write_text(yaml.safe_dump(run_cfg))

    def sweep(data: str) -> list[str]:
        return [str(BIN / "raycyto"), "sweep", "--config", str(root / "sweep.yaml"), "--data", str(root / data),
                "--out", str(root / "exp" / data.replace("/", "_")), "--quiet"]

    return {
        "all_unreadable": sweep("unreadable"),
        "too_few_patients": sweep("few"),
        "manifest_missing_files": sweep("gone/list.csv"),
        "run_weights_in_ray_actor": [str(BIN / "raycyto"), "run", "--config", str(root / "run.yaml"),
                                     "--out", str(root / "run"), "--set", "grid.backbones=[resnet18]"],
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """case -> (exit code, stdout, stderr) of its ``raycyto`` process."""
    root = tmp_path_factory.mktemp("unusable")
    commands = _inputs(root)
    (root / "torch_home").mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rce", dir="/tmp")  # short: Ray's socket paths are length-limited
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    gcs, *free = free_ports(1 + len(names))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(root / "torch_home")}
    env.pop("RAY_ADDRESS", None)
    env.pop("COLUMNS", None)  # rich's 80 columns off a terminal: a wrapped error line would show
    procs = {}
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={gcs}",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                        *(f"--{n}={p}" for n, p in zip(names, free))],
                       env=env, check=True, capture_output=True, timeout=120)
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        for case, argv in commands.items():
            procs[case] = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        results = {}
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[case] = (proc.returncode, out, err)
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        stop_head(temp_dir)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_unusable_input_exits_2_with_one_error_line_and_no_traceback(outcomes, case):
    code, out, err = outcomes[case]
    names, also = EXPECTED[case]
    assert code == 2, (out + err)[-4000:]
    assert "Traceback" not in out + err, (out + err)[-4000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and names in last, err[-2000:]
    assert also is None or also in err  # the bad-file report; the Ray Data actor pool the error came from


def test_error_line_unwraps_what_ray_makes_of_a_raycyto_error():
    from ray.exceptions import ActorDiedError, RayTaskError

    from raycyto.errors import DataError, WeightsError, error_line

    cause = DataError("head b SVM needs every class\n   with >= 3 samples")
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
             "raycyto.errors.WeightsError: w.pth not found in /x; download it\n  there")
    task = RayTaskError("f", trace.replace("WeightsError: w.pth not found in /x; download it\n  there",
                                           f"DataError: {cause}"), cause).as_instanceof_cause()
    assert isinstance(task, DataError)  # caught as a RaycytoError, but its text is Ray's traceback
    assert error_line(task) == "head b SVM needs every class with >= 3 samples"
    died = ActorDiedError(RayTaskError("__init__", trace, WeightsError("lost in pickling")))
    assert error_line(died) == "w.pth not found in /x; download it there"  # only the text is kept
    try:  # Ray Data raises it `from SystemException()`: the chain is searched too
        try:
            raise died
        except ActorDiedError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert error_line(e) == "w.pth not found in /x; download it there"
    assert error_line(ValueError("a bug")) is None
    assert error_line(RayTaskError("f", "Traceback ...\nValueError: a bug", ValueError("a bug"))) is None
    assert error_line(ActorDiedError(RayTaskError("f", "raycyto.errors.bogus: x", ValueError()))) is None
