"""The tenants of the payoff benchmark and the checkpoints they use.

Half the tenants send to the base model, deployed shared; the other half each upload an ESFT fine-tune of
it for their domain (bench/trainedlib/esft.py: only the experts with the highest affinity to the domain
trained, every other tensor the base's bytes) and use it as a private model. The base is the trained model
of bench/trained_model.py, or (--random) a model of the same shape and tokenizer with random weights, whose
routers spread every prompt over all experts: the same sweep on both shows what trained routing buys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.payofflib.trace import TenantTraffic, geometric_rates

PRIVATE_DOMAINS = ("c", "man-de", "man-en", "man-es", "python", "man-fr", "man-it", "man-pl")
SHARED_DOMAINS = ("python", "man-en", "c", "man-fr", "man-de", "man-es", "man-it", "man-pl")
CV_PATTERN = (1.0, 4.0, 4.0, 1.0)  # every kind of tenant gets both burstiness levels at high and low rates


@dataclass(frozen=True)
class Deployment:
    """What the servers deploy: model name -> checkpoint, and the owner of each private model."""

    models: dict[str, Path]
    owners: dict[str, str]  # private model -> its tenant
    tenants: list[TenantTraffic]

    def model_of(self, tenant: str) -> str:
        return next(t.model for t in self.tenants if t.name == tenant)


def plan_tenants(count: int, available: set[str], fine_tunes: int | None = None) -> list[tuple[str, str, bool, int]]:
    """(tenant, domain, private, version) for `count` tenants, `fine_tunes` of them private (half by
    default), spread evenly over the list so private tenants have high and low rates alike. The k-th
    private tenant of a domain uploads version k of its fine-tune: same domain, its own training run."""
    fine_tunes = count // 2 if fine_tunes is None else fine_tunes
    if not 0 <= fine_tunes <= count:
        raise ValueError(f"--fine-tunes {fine_tunes} must be between 0 and --tenants {count}")
    private = [d for d in PRIVATE_DOMAINS if d in available]
    shared = [d for d in SHARED_DOMAINS if d in available]
    if not private or not shared:
        raise RuntimeError(f"the corpus has too few domains on this machine: {sorted(available)}")
    out, tuned, served = [], 0, 0
    for i in range(count):
        if (i * fine_tunes) % count < fine_tunes:
            domain = private[tuned % len(private)]
            out.append((f"tenant-{i}", domain, True, tuned // len(private)))
            tuned += 1
        else:
            out.append((f"tenant-{i}", shared[served % len(shared)], False, 0))
            served += 1
    return out


def random_base(trained: Path, out: Path, seed: int = 1) -> Path:
    """A checkpoint of `trained`'s architecture and tokenizer with freshly initialised (random) weights."""
    if (out / "model.safetensors").exists():
        return out
    import transformers

    config = transformers.AutoConfig.from_pretrained(trained)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((trained / name).read_bytes())
    model.save_pretrained(out, safe_serialization=True)  # last: the file that says the build is complete
    return out


def build(root: Path, tenants: int, random_weights: bool, tune_seconds: float, fine_tunes: int | None = None,
          log=print) -> tuple[Deployment, dict]:
    """The base and one ESFT fine-tune per private tenant (built now unless cached under root/models), the
    tenants' traffic, and each domain's held-out token stream (the prompts' text)."""
    from bench.trainedlib.esft import domain_stream, fine_tune
    from bench.trainedlib.train import TrainSpec, corpus, default_dir
    from bench.trainedlib.train import build as build_trained

    spec = TrainSpec()
    base = build_trained(default_dir(root, spec), spec)
    if random_weights:
        base = random_base(base, root / "models" / f"random-{base.name}")
    texts = corpus(spec)
    plan = plan_tenants(tenants, set(texts), fine_tunes)
    models, owners, traffic = {"base": base}, {}, []
    rates = geometric_rates(tenants)
    for i, (name, domain, private, version) in enumerate(plan):
        model = "base"
        if private:
            model = f"{name}-esft-{domain}"
            suffix = f"-v{version}" if version else ""  # version 0 keeps the name checkpoints were cached under
            out = root / "models" / f"esft-{base.name}-{domain}-{tune_seconds:g}s{suffix}"
            if not out.exists():
                log(f"fine-tuning {base.name} on {domain} for {tune_seconds:g}s (ESFT) -> {out.name}")
            seed = PRIVATE_DOMAINS.index(domain) + len(PRIVATE_DOMAINS) * version
            models[model] = fine_tune(base, out, domain_stream(base, texts[domain][0]), seconds=tune_seconds,
                                      seed=seed)
            owners[model] = name
        traffic.append(TenantTraffic(name, model, domain, rates[i], CV_PATTERN[i % len(CV_PATTERN)]))
    streams = {t.domain: domain_stream(base, texts[t.domain][1]).tolist() for t in traffic}
    return Deployment(models, owners, traffic), streams
