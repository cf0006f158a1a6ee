"""The `faasmoe` command as vLLM users expect it (issue 12): --version, "did you mean", clear start-up
failures, --served-model-name and Hugging Face cache snapshots, --allowed-origins, --access-log."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import socket
from pathlib import Path

import pytest

from faasmoe.cli import build_parser, main
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
from faasmoe.serve.process import ServeOptions, access_logger, default_model_name, merged_config


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("cli-compat") / "tiny", "qwen2_moe", seed=1, progress=False)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"faasmoe {importlib.metadata.version('faasmoe')}"


@pytest.mark.parametrize("argv,hint", [
    (["serve", "m", "--prot", "80"], "--prot (did you mean --port?)"),
    (["serve", "m", "--keep-alvie=3"], "--keep-alvie=3 (did you mean --keep-alive?)"),
    (["tenant", "add", "x", "--max-concurent", "3"], "(did you mean --max-concurrent?)"),
    (["worker", "join", "h:1", "--memroy", "4GiB"], "(did you mean --memory?)"),
])
def test_a_mistyped_flag_gets_a_suggestion(argv: list[str], hint: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and hint in err, err


@pytest.mark.parametrize("command", ["serve", "frontend"])
def test_an_unknown_tool_call_parser_is_an_error_at_start(command: str, capsys) -> None:
    extra = ["--scheduler", "h:1"] if command == "frontend" else []
    with pytest.raises(SystemExit) as exit_:
        main([command, "m", *extra, "--tool-call-parser", "llama3_json"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--tool-call-parser: invalid choice: 'llama3_json'" in err and "hermes" in err and "mistral" in err, err
    args = build_parser().parse_args([command, "m", *extra, "--no-enable-auto-tool-choice"])
    assert args.auto_tool_choice is False and args.tool_call_parser is None


def test_a_port_in_use_fails_at_once_with_a_clear_message(model: Path, tmp_path: Path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "state.db"
        code = main(["serve", str(model), "--port", str(port), "--experts", "in-process", "--state", str(state)])
    err = capsys.readouterr().err
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err, err
    assert "Errno" not in err
    assert not state.exists(), "nothing is started before the port is known to be free"


def test_a_missing_model_directory_is_reported_missing(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"model directory {tmp_path / 'nope'} does not exist" in err and "config.json" not in err, err
    (tmp_path / "file").write_text("x")
    assert main(["serve", str(tmp_path / "file"), "--port", "0"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_served_model_names_and_hf_cache_snapshots(model: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen1.5-MoE-A2.7B-Chat" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(model, target_is_directory=True)  # the cache's files are links too
    plain = tmp_path / "hub" / "models--gpt2" / "snapshots" / "ffff"
    plain.mkdir(parents=True)
    assert default_model_name(plain) == "gpt2" and default_model_name(model) == "tiny"
    assert default_model_name(tmp_path / "hub" / "models--gpt2" / "snapshots" / "ffff" / ".") == "gpt2"
    link = tmp_path / "my-model"
    link.symlink_to(model, target_is_directory=True)  # not a snapshot: the directory it leads to names it
    assert default_model_name(link) == "tiny"
    assert [m.name for m in merged_config(ServeOptions(model_dirs=[snapshot])).models] == ["Qwen/Qwen1.5-MoE-A2.7B-Chat"]
    args = build_parser().parse_args(["serve", str(model), "--served-model-name", "Qwen/Qwen1.5-MoE-A2.7B-Chat",
                                      "qwen-moe", "--served-model-name", "q"])
    assert args.served_model_names == ["Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen-moe", "q"]
    config = merged_config(ServeOptions(model_dirs=[model], served_model_names=args.served_model_names))
    assert [(m.name, m.aliases) for m in config.models] == [("Qwen/Qwen1.5-MoE-A2.7B-Chat", ["qwen-moe", "q"])]
    config = merged_config(ServeOptions(model_dirs=[model, model], served_model_names=["a", "b/c"]))
    assert [(m.name, m.aliases) for m in config.models] == [("a", []), ("b/c", [])]
    with pytest.raises(ValueError, match="2 MODEL_DIRs"):
        merged_config(ServeOptions(model_dirs=[model, model], served_model_names=["a", "b", "c"]))
    with pytest.raises(ValueError, match="served-model-name 'a:b'"):
        merged_config(ServeOptions(model_dirs=[model], served_model_names=["a:b"]))


def test_allowed_origins_and_access_log_flags(model: Path, capsys) -> None:
    args = build_parser().parse_args(["serve", str(model), "--allowed-origins", '["https://a.example"]',
                                      "--allowed-origins", "https://b.example,https://c.example", "--access-log"])
    assert args.allowed_origins == ["https://a.example", "https://b.example", "https://c.example"] and args.access_log
    args = build_parser().parse_args(["frontend", "--scheduler", "h:1", str(model)])
    assert args.allowed_origins == [] and not args.access_log
    logger = access_logger()
    assert logger.level == logging.INFO and not logger.propagate

    async def one_request() -> None:  # the frontend's runner, as `serve --access-log` builds it
        import aiohttp
        from aiohttp import web

        from faasmoe.api.app import FrontendContext, create_app
        from faasmoe.api.http_server import FrontendRunner
        from faasmoe.engine.deployments import Deployments
        from faasmoe.tenancy.admission import Admission

        async def nothing():
            return ""

        ctx = FrontendContext(Deployments(), None, None, None, Admission(), None, nothing, nothing)
        runner = FrontendRunner(create_app(ctx), access_log=logger)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/health") as resp:
                    assert resp.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(one_request())
    assert '"GET /health HTTP/1.1" 200' in capsys.readouterr().out
