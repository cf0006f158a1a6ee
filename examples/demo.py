"""`make run`: start `faasmoe serve` on the tiny model with two tenants and two workers, and show it.

Prints the live view's URL (/dashboard), sends a streamed completion from one tenant and a chat
from the other, prints the answers, which expert functions are resident where, and the usage
ledger; then waits past the keep-alive to show the experts scaled to zero, and stops the server
cleanly. The tiny model has random weights: its text is noise; the plumbing is what is on show.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KEYS = {"acme": "fm-acme-demo0000000000000000000000000000", "globex": "fm-globex-demo000000000000000000000000000"}


def wait_ready(proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        print(f"  [serve] {line.rstrip()}")
        if "faasmoe serving" in line:
            return
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"faasmoe serve did not start (exit code {proc.poll()})")


def cluster(url: str) -> dict:
    request = urllib.request.Request(url + "/admin/cluster", headers={"Authorization": f"Bearer {KEYS['acme']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def show_cluster(url: str) -> tuple[int, int]:
    """Print what every worker and model holds; return (device, host-cache) expert bytes over all workers."""
    state = cluster(url)
    for w in state["workers"]:
        names = state["functions"]  # ids are content digests; each resident function has a name for people
        fns = ", ".join(names[f]["name"] if f in names else f[:12] for f in w["resident_functions"]) or "(none)"
        print(f"  worker {w['id']} (pid {w['pid']}, {w['device']}): {w['device_bytes'] / 2**20:.2f} MiB of experts "
              f"on device, {w['host_cache_bytes'] / 2**20:.2f} MiB in the host cache; functions: {fns}")
    for name, m in state["models"].items():
        print(f"  model {name}: {m['resident_functions']} of {m['functions']} expert functions on a device "
              f"({m['device_bytes'] / 2**20:.2f} MiB), {m['host_bytes'] / 2**20:.2f} MiB in host caches, "
              f"trunk {m['trunk_bytes'] / 2**20:.2f} MiB")
    return sum(w["device_bytes"] for w in state["workers"]), sum(w["host_cache_bytes"] for w in state["workers"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/tiny-qwen2_moe"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep-alive", type=float, default=4.0)
    args = parser.parse_args()
    import openai

    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    if not (args.model / "config.json").exists():
        print(f"building the tiny model in {args.model} ...")
        init_checkpoint(args.model, "qwen2_moe", preset="tiny", seed=0, progress=False)
    work = Path(tempfile.mkdtemp(prefix="faasmoe-demo-"))
    config = work / "faasmoe.toml"
    config.write_text(
        f'[server]\nport = {args.port}\nworkers = 2\ndevice = "cpu"\nstate = "{work / "state.db"}"\n'
        f'keep_alive = {args.keep_alive}\n\n'
        f'[[models]]\nname = "tiny"\npath = "{args.model.resolve()}"\nexpert_block_size = 4\n\n'
        f'[[tenants]]\nname = "acme"\nmodels = ["tiny"]\nadmin = true\napi_keys = ["{KEYS["acme"]}"]\n\n'
        f'[[tenants]]\nname = "globex"\nmodels = ["tiny"]\ntokens_per_minute = 100000\n'
        f'api_keys = ["{KEYS["globex"]}"]\n'
    )
    print(f"== faasmoe serve --config {config}  (two tenants, two workers, keep-alive {args.keep_alive:g}s)")
    proc = subprocess.Popen([sys.executable, "-m", "faasmoe.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(proc)
        # acme is an admin tenant; the key rides in the fragment, which the browser never sends to a server
        print(f"\n== live view (open it while the demo runs; --keep-alive 60 gives you longer): "
              f"{url}/dashboard#key={KEYS['acme']}")
        acme = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"])
        globex = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["globex"])
        print("\n== tenant acme, streamed completion (random weights: the text is noise)")
        print("  ", end="")
        for chunk in acme.completions.create(model="tiny", prompt="The experts say", max_tokens=24, stream=True,
                                             temperature=0.8, seed=1):
            if chunk.choices:
                print(chunk.choices[0].text, end="", flush=True)
        print("\n\n== tenant globex, chat")
        chat = globex.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                              max_tokens=24, temperature=0.8, seed=2)
        print(f"   {chat.choices[0].message.content!r}  ({chat.usage.completion_tokens} tokens)")
        print("\n== resident expert functions (loaded on first use)")
        show_cluster(url)
        print("\n== usage ledger (faasmoe usage)")
        subprocess.run([sys.executable, "-m", "faasmoe.cli", "usage", "--state", str(work / "state.db")], check=True)
        print(f"\n== waiting {args.keep_alive + 2:g}s, past the keep-alive: idle experts scale to zero")
        time.sleep(args.keep_alive + 2)
        device, host = show_cluster(url)
        zero = "scaled to zero" if device + host == 0 else "NOT zero"
        print(f"   resident expert bytes now: {device + host} ({device} on devices, {host} in host caches: {zero})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        for line in proc.stdout:
            print(f"  [serve] {line.rstrip()}")
    print(f"\n== server stopped cleanly (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
