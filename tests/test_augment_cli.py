"""The `augment` CLI: user errors as one line, the key never written, literal LLM text on screen."""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import malformed_script, stable_fraction

from anchoralign.cli import run_cli
from anchoralign.datasets import load_split
from anchoralign.tokenize import tokenize
from augment.cli import build_parser
from augment.runner import UNUSABLE_AFTER_SOURCES
from augment.scripted_server import Reply, ScriptedServer, good_answer, good_script

CANARY = "sk-canary-7f3a9c1e5b2d4068"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    # Rich wraps to the terminal width; a wide one keeps asserted strings on one line.
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def cli(*argv: str) -> int:
    return run_cli(build_parser(), list(argv))


def run_args(data: Path, url: str, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--dataset",
        "conll04",
        "--data-dir",
        str(data),
        "--base-url",
        url,
        "--out",
        str(out),
        "--concurrency",
        "4",
        "--timeout",
        "5",
        "--backoff",
        "0.01",
        *extra,
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_prints_a_summary(shared_data, tmp_path, capsys):
    with ScriptedServer(good_script()) as srv:
        assert cli(*run_args(shared_data, srv.url, tmp_path / "out", "--cap", "40")) == 0
    out = capsys.readouterr().out
    assert "cap_reached" in out and "40 of cap 40" in out


def test_the_key_is_sent_but_never_written_or_printed(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_CANARY_KEY", CANARY)

    def script(body, attempt):
        if stable_fraction(body, "refuse") < 0.2:  # some prompts get a 400 that echoes the key back
            return Reply(status=400, message=f"context too long for key {CANARY}")
        return Reply(text=good_answer(body))

    out = tmp_path / "out"
    with ScriptedServer(script) as srv:
        rc = cli(*run_args(shared_data, srv.url, out, "--cap", "60", "--api-key-env", "MY_CANARY_KEY"))
        assert {r.authorization for r in srv.requests} == {f"Bearer {CANARY}"}
    assert rc == 0
    with ScriptedServer(
        lambda body, attempt: Reply(status=401, message=f"Incorrect API key {CANARY}")
    ) as srv:
        rc401 = cli(*run_args(shared_data, srv.url, tmp_path / "out401", "--api-key-env", "MY_CANARY_KEY"))
    assert rc401 == 2
    captured = capsys.readouterr()
    assert CANARY not in captured.out + captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"journal.jsonl", "config.json", "stats.json", "rejected.jsonl"}
    for p in written:
        assert CANARY not in p.read_text(errors="replace"), f"the key leaked into {p}"
    config = json.loads((out / "config.json").read_text())
    assert config["api_key_env"] == "MY_CANARY_KEY"


def test_a_refused_key_stops_at_once_with_one_line(shared_data, tmp_path, capsys):
    with ScriptedServer(lambda body, attempt: Reply(status=401, message="invalid key")) as srv:
        rc = cli(*run_args(shared_data, srv.url, tmp_path / "out"))
        n = len(srv.requests)
    err = capsys.readouterr().err
    assert rc == 2
    assert n <= 4  # the first wave at most, not the dataset
    assert "HTTP 401" in err and "API key was refused" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_a_refused_request_is_a_rejection_and_the_run_goes_on(shared_data, tmp_path, capsys):
    def script(body, attempt):
        if stable_fraction(body, "refuse") < 0.2:
            return Reply(status=400, message="This model's maximum context length is 8 tokens")
        return Reply(text=good_answer(body))

    out = tmp_path / "out"
    with ScriptedServer(script) as srv:
        assert cli(*run_args(shared_data, srv.url, out, "--cap", "300")) == 0
    refused = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    refused = [r for r in refused if r["reason"] == "request_rejected"]
    assert refused and all(
        "HTTP 400" in r["detail"] and "maximum context length" in r["detail"] for r in refused
    )
    assert len((out / "unmasked.jsonl").read_text().splitlines()) == 300


def test_an_unreachable_endpoint_is_one_clear_message_at_once(shared_data, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    started = time.monotonic()
    # Default retries and a slow backoff: the message must not wait for them.
    rc = cli(*run_args(shared_data, url, tmp_path / "out", "--max-retries", "6", "--backoff", "2"))
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot connect to {url}" in err and "check --base-url" in err and "Traceback" not in err
    assert elapsed < 10


def test_a_refused_endpoint_leaves_no_corpus_files(shared_data, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert cli(*run_args(shared_data, url, tmp_path / "new" / "out")) == 2
    assert not (tmp_path / "new").exists()  # nothing that looks like a result, not even the folder
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli(*run_args(shared_data, url, existing)) == 2
    assert list(existing.iterdir()) == []


def test_a_refused_key_leaves_no_corpus_files(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(lambda body, attempt: Reply(status=401, message="invalid key")) as srv:
        assert cli(*run_args(shared_data, srv.url, out)) == 2
    assert not out.exists()


def test_an_endpoint_whose_every_answer_is_unusable_exits_non_zero_with_one_line(
    shared_data, tmp_path, capsys
):
    out = tmp_path / "out"
    with ScriptedServer(lambda body, attempt: Reply(text="Sorry, I cannot rewrite that sentence.")) as srv:
        rc = cli(*run_args(shared_data, srv.url, out))
        n = len(srv.requests)
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert (
        lines[0].startswith("error: no samples: none of the ")
        and "passed validation (unparsable " in lines[0]
    )
    assert "so the run stopped there" in lines[0] and f"augment rejects --out {out}" in lines[0]
    # It gave up after the first sources instead of sending the whole training set.
    assert n <= 2 * (UNUSABLE_AFTER_SOURCES + 4)
    assert not (out / "unmasked.jsonl").exists() and not (out / "masked.jsonl").exists()
    stats = json.loads((out / "stats.json").read_text())  # the diagnostics stay, for `augment rejects`
    assert stats["status"] == "no_samples" and stats["samples"]["selected"] == 0
    assert cli("rejects", "--out", str(out), "--reason", "unparsable", "--limit", "1") == 0


def test_an_endpoint_whose_every_body_is_unusable_exits_non_zero_with_one_line(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(lambda body, attempt: Reply(body=b"<html>502 Bad Gateway</html>")) as srv:
        rc = cli(*run_args(shared_data, srv.url, out, "--max-retries", "1"))
        n = len(srv.requests)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "none of the first 4 requests got a usable answer" in lines[0]
    assert n <= 2 * 8  # the first wave and its retries
    assert not out.exists()


def test_a_run_with_no_sample_is_an_error_even_when_few_sources_were_asked(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(lambda body, attempt: Reply(text="1. no placeholders here")) as srv:
        rc = cli(*run_args(shared_data, srv.url, out, "--max-sources", "3"))
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().startswith("error: no samples: none of the ")
    assert "so the run stopped there" not in captured.err  # it did not give up: 3 was all it asked
    assert not (out / "unmasked.jsonl").exists()


def test_the_start_says_the_goal_and_the_bound_only_when_given(shared_data, tmp_path, capsys):
    with ScriptedServer(good_script()) as srv:
        assert cli(*run_args(shared_data, srv.url, tmp_path / "a", "--cap", "30")) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert cli(*run_args(shared_data, srv.url, tmp_path / "b", "--cap", "30", "--max-sources", "5")) == 0
        second = capsys.readouterr().out.splitlines()[0]
    assert "goal 30 samples" in first and "--max-sources" not in first
    assert "goal 30 samples, or fewer if the first 5 sources (--max-sources)" in second


def test_the_summary_rate_is_answers_over_the_runs_time(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(good_script(delay=0.05)) as srv:
        assert cli(*run_args(shared_data, srv.url, out, "--cap", "60")) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    answered, elapsed = stats["requests"]["answered"], stats["elapsed_s"]
    # stats.json keeps elapsed_s to the millisecond and the rate from the unrounded time: a run of
    # a few tenths of a second differs by more than a relative 1e-3 from the rounded quotient.
    assert answered / (elapsed + 5e-4) - 1e-4 <= stats["requests_per_s"] <= answered / (elapsed - 5e-4) + 1e-4
    assert f"{answered} requests answered, {answered / elapsed:.1f} req/s" in printed


def test_an_endpoint_that_dies_mid_run_is_reported_after_the_retries(shared_data, tmp_path, capsys):
    # Reachable at the start (the check passes), then every request is dropped.
    with ScriptedServer(lambda body, attempt: Reply(drop=True)) as srv:
        rc = cli(*run_args(shared_data, srv.url, tmp_path / "out", "--max-retries", "1"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "none of the first 4 requests got through" in err and "Traceback" not in err


def test_a_run_served_wholly_from_the_journal_needs_no_endpoint(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedServer(good_script()) as srv:
        assert cli(*run_args(shared_data, srv.url, out, "--max-sources", "6")) == 0
    first = (out / "unmasked.jsonl").read_bytes()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert cli(*run_args(shared_data, url, out, "--max-sources", "6")) == 0
    assert (out / "unmasked.jsonl").read_bytes() == first


def test_no_key_for_deepseek_is_a_user_error(shared_data, tmp_path, capsys):
    rc = cli("run", "--dataset", "conll04", "--data-dir", str(shared_data), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "DEEPSEEK_API_KEY" in err


def test_rules_build_a_corpus_offline_with_invented_names_and_no_key(shared_data, tmp_path, capsys):
    out = tmp_path / "rules"
    argv = [
        "run",
        "--dataset",
        "conll04",
        "--data-dir",
        str(shared_data),
        "--llm",
        "rules",
        "--variants",
        "1",
    ]
    assert cli(*argv, "--max-sources", "10", "--out", str(out)) == 0
    said = capsys.readouterr()
    assert "no LLM (--llm rules)" in said.err + said.out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"] == "rules:v1" and stats["samples"]["selected"] == 30
    assert stats["samples"]["by_origin"] == {"mention": 10, "context": 10, "cross": 10}
    sources = {s.id: s for s in load_split("conll04", "train", str(shared_data))}
    for line in (out / "unmasked.jsonl").open():
        sample = json.loads(line)
        source = sources[sample["source_id"]]
        names = {" ".join(sample["tokens"][e["start"] : e["end"]]) for e in sample["entities"]}
        originals = {" ".join(source.tokens[e.start : e.end]) for e in source.entities}
        # The labels carry over unchanged.
        assert sorted(e["type"] for e in sample["entities"]) == sorted(e.type for e in source.entities)
        assert len(sample["relations"]) == len(source.relations)
        # A mention rewrite invents every name; a context rewrite keeps them behind an opener.
        if sample["origin"] == "mention":
            assert not names & originals, sample
        if sample["origin"] == "context":
            assert names == originals and sample["tokens"][0] in {"Reportedly", "According", "As", "In"}


def test_rules_shaped_names_keep_each_mention_shape_under_their_own_model_name(shared_data, tmp_path):
    out = tmp_path / "shaped"
    argv = ["run", "--dataset", "conll04", "--data-dir", str(shared_data), "--llm", "rules"]
    assert (
        cli(*argv, "--rules-names", "shaped", "--variants", "1", "--max-sources", "10", "--out", str(out))
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    # Its own model name: a journal never answers one style's request with the other's.
    assert stats["model"] == "rules:shaped-v1" and stats["samples"]["selected"] == 30
    assert json.loads((out / "config.json").read_text())["rules_names"] == "shaped"
    sources = {s.id: s for s in load_split("conll04", "train", str(shared_data))}
    n_mentions = 0
    for line in (out / "unmasked.jsonl").open():
        sample = json.loads(line)
        if sample["origin"] != "mention":
            continue
        source = sources[sample["source_id"]]
        news = sorted(sample["entities"], key=lambda e: e["start"])
        for e, o in zip(news, sorted(source.entities, key=lambda e: e.start), strict=True):
            new = sample["tokens"][e["start"] : e["end"]]
            original = tokenize(" ".join(source.tokens[o.start : o.end]))
            assert e["type"] == o.type and len(new) == len(original), (new, original)
            # Lower-case words and punctuation stay; a name or a number does not.
            for a, b in zip(new, original, strict=True):
                assert a == b or b[:1].isupper() or any(c.isdigit() for c in b), (new, original)
            n_mentions += 1
    assert n_mentions >= 20


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--base-url", "http://127.0.0.1:9/v1"], "base_url cannot be combined with llm 'rules'"),
        (["--verify"], "verify needs an LLM to ask"),
    ],
)
def test_rules_refuse_what_needs_an_llm(shared_data, tmp_path, capsys, extra, message):
    argv = ["run", "--dataset", "conll04", "--data-dir", str(shared_data), "--llm", "rules", *extra]
    assert cli(*argv, "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rules_names_need_the_rules(shared_data, tmp_path, capsys):
    argv = ["run", "--dataset", "conll04", "--data-dir", str(shared_data), "--rules-names", "shaped"]
    assert cli(*argv, "--out", str(tmp_path / "o")) == 2
    assert "rules_names is only used with llm 'rules'" in capsys.readouterr().err


def test_missing_data_is_a_user_error(tmp_path, capsys):
    with ScriptedServer() as srv:
        rc = cli(*run_args(tmp_path / "nowhere", srv.url, tmp_path / "out"))
        assert srv.requests == []
    assert rc == 2
    assert "Traceback" not in capsys.readouterr().err


def test_config_file_with_flag_overrides_and_field_errors(shared_data, tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text(f"dataset: conll04\ndata_dir: {shared_data}\ncap: 999\nvariants: 2\n")
    with ScriptedServer(good_script(k=2)) as srv:
        args = [
            "run",
            "--config",
            str(good),
            "--base-url",
            srv.url,
            "--out",
            str(tmp_path / "o"),
            "--cap",
            "20",
        ]
        assert cli(*args) == 0
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["cap"] == 20 and saved["variants"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: conll04\nconcurrency: 0\n")
    assert cli("run", "--config", str(bad)) == 2
    assert "field 'concurrency'" in capsys.readouterr().err
    bad.write_text("dataset: conll04\nconcurency: 4\n")
    assert cli("run", "--config", str(bad)) == 2
    assert "concurency" in capsys.readouterr().err


def test_dry_run_shows_prompts_and_sends_nothing(shared_data, tmp_path, capsys):
    with ScriptedServer() as srv:
        assert cli(*run_args(shared_data, srv.url, tmp_path / "o", "--dry-run", "--cap", "100")) == 0
        assert srv.requests == []
    out = capsys.readouterr().out
    assert "mention prompt" in out and "context prompt" in out and "<mask0>" in out
    assert "requests: at most 1844 (2 per source)" in out and "nothing was sent" in out
    assert "already journalled: 0 of" in out
    with ScriptedServer() as srv:
        assert cli(*run_args(shared_data, srv.url, tmp_path / "o", "--cap", "100")) == 0
        n_sent = len(srv.requests)
        capsys.readouterr()
        assert cli(*run_args(shared_data, srv.url, tmp_path / "o", "--dry-run", "--cap", "100")) == 0
        assert len(srv.requests) == n_sent
    journalled = re.search(r"already journalled: (\d+) of", capsys.readouterr().out)
    # Per source request: a sentence that occurs twice in the split shares one journalled answer.
    assert journalled and int(journalled.group(1)) >= n_sent > 0


@pytest.fixture
def rejected_run(shared_data, tmp_path) -> Path:
    """A finished run whose answers include rich markup that must stay literal."""

    def script(body, attempt):
        if stable_fraction(body, "markup") < 0.1:
            return Reply(text="1. [bold]x[/] and [/] and [red]")
        return malformed_script()(body, attempt)

    out = tmp_path / "out"
    with ScriptedServer(script) as srv:
        assert cli(*run_args(shared_data, srv.url, out, "--cap", "5000", "--max-sources", "80")) == 0
    return out


def test_rejects_shows_llm_text_literally(rejected_run, capsys):
    capsys.readouterr()
    assert cli("rejects", "--out", str(rejected_run), "--limit", "0") == 0
    out = capsys.readouterr().out
    assert "[bold]x[/] and [/] and [red]" in out
    assert "count_mismatch" in out

    assert cli("rejects", "--out", str(rejected_run), "--reason", "unknown_placeholder", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (
        rows
        and {r["reason"] for r in rows} == {"unknown_placeholder"}
        and {r["kind"] for r in rows} == {"context"}
    )

    assert cli("rejects", "--out", str(rejected_run), "--kind", "mention", "--limit", "3", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and {r["kind"] for r in rows} == {"mention"}

    assert cli("rejects", "--out", str(rejected_run), "--reason", "no_such_reason") == 2
    assert "known: " in capsys.readouterr().err


def test_stats_and_show(rejected_run, capsys):
    capsys.readouterr()
    assert cli("stats", "--out", str(rejected_run), "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["status"] == "source_limit" and stats["rejected_by_reason"]
    assert cli("stats", "--out", str(rejected_run)) == 0
    assert "rejected by reason" in capsys.readouterr().out

    rejected = [json.loads(x) for x in (rejected_run / "rejected.jsonl").read_text().splitlines()]
    row = next(r for r in rejected if r["reason"] == "type_changed")
    assert cli("show", "--out", str(rejected_run), row["source_id"]) == 0
    out = capsys.readouterr().out
    assert f"source {row['source_id']}" in out and "type_changed" in out and "accepted" in out

    assert cli("show", "--out", str(rejected_run), "no-such-id") == 2
    assert "no sentence with id" in capsys.readouterr().err
    assert cli("stats", "--out", str(rejected_run / "missing")) == 2


def test_every_config_field_is_a_documented_run_flag(capsys):
    from augment.cli import config_from_args
    from augment.config import AugmentConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = capsys.readouterr().out
    for name in AugmentConfig.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name
    assert "longest wait between two retries" in help_text  # --backoff-max, from its description
    args = build_parser().parse_args(
        [
            "run",
            "--dataset",
            "conll04",
            "--backoff-max",
            "5",
            "--mention-prompt",
            "m.txt",
            "--verify",
            "--model",
            "7",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.backoff_max, cfg.mention_prompt, cfg.verify, cfg.model) == (5.0, "m.txt", True, "7")
    assert cfg.context_prompt is None and cfg.cap == 10_000  # flags not given keep their defaults


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path):
    # `augment rejects --json | head -1`: the reader closes the pipe while the command still
    # writes; the command stops with SIGPIPE's status and no traceback on stderr.
    row = {"source_id": "conll04-train-1", "kind": "mention", "reason": "type_changed", "text": "x" * 200}
    (tmp_path / "rejected.jsonl").write_text((json.dumps(row) + "\n") * 5000)  # 1 MB: more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "augment.cli", "rejects", "--out", str(tmp_path), "--json", "--limit", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert json.loads(proc.stdout.readline())["reason"] == "type_changed"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def test_a_broken_connection_of_the_command_itself_is_not_hidden():
    # Only stdout's reader going away is quiet; a BrokenPipeError from anywhere else propagates.
    def fails(_):
        raise BrokenPipeError("the server closed the socket")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fails)
    with pytest.raises(BrokenPipeError):
        run_cli(parser, [])


def test_rejects_keep_ids_and_reasons_whole_on_a_narrow_terminal(tmp_path, monkeypatch, capsys):
    # At 80 columns the LLM's long text wraps; the source id and the reason, which a reader
    # scans and searches for, stay whole on their lines.
    monkeypatch.setenv("COLUMNS", "80")
    row = {
        "source_id": "conll04-train-5423",
        "kind": "context",
        "reason": "missing_placeholder",
        "text": "The <mask3> company , founded by two people , will celebrate " * 4,
        "detail": "missing <mask0>, <mask1> (the source has <mask0>, <mask1>, <mask2>, <mask3>)",
    }
    (tmp_path / "rejected.jsonl").write_text(json.dumps(row) + "\n")
    capsys.readouterr()
    assert cli("rejects", "--out", str(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("conll04-train-5423" in line for line in lines)
    assert any("missing_placeholder" in line for line in lines)
    assert sum("celebrate" in line for line in lines) == 4  # the variant wraps, all of it shown
