"""One debiasing run (sbssl.debias.run_debias): metrics.json, the selected epoch's backbone (model.pt) and the
lock of its sha256 (weights.lock) against which the audit's embedding job verifies it.

params: settings (the sbssl.debias.DebiasConfig fields that change this method's numbers; the others keep their
defaults), data (the data set's folder, None when embedded), init_model (the zoo model whose checkpoint,
settings["init_weights"], initialises the backbone: verified against weights_lock first; None). The device is
CUDA when present.
"""
from pathlib import Path

from sbssl.debias import run_debias
from sbssl.debias.audit import DebiasRun, debiased_zoo_entry
from sbssl.io import job_log
from sbssl.models import model_definition_from_dict, verify_weights, write_weights_lock

with job_log(snakemake.log[0]):
    w, settings = snakemake.wildcards, snakemake.params.settings
    out = Path(snakemake.output.metrics).parent
    init = snakemake.params.init_model
    if init is not None:
        definition = model_definition_from_dict(init["name"], {k: v for k, v in init.items() if k != "name"})
        verify_weights(definition, settings["init_weights"], snakemake.params.weights_lock)
    metrics = run_debias(w.dataset, w.method, int(w.seed), out, data=snakemake.params.data, options=settings,
                         num_workers=max(0, snakemake.threads - 1), discard_other_settings=True)
    run = DebiasRun(w.dataset, w.method, int(w.seed))
    entry = debiased_zoo_entry(run, snakemake.output.model, settings["backbone"])
    sha256 = write_weights_lock(entry, snakemake.output.model, snakemake.output.lock)
    print(f"{w.method} on {w.dataset}, seed {w.seed}: test worst-group accuracy {metrics['worst_group_acc']:.3f}, "
          f"average {metrics['avg_acc']:.3f} (epoch {metrics['best_epoch']}); model.pt sha256 {sha256}")
