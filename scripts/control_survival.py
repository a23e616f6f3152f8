"""Which biases survive pixel permutation of the target images (sbssl.control)."""
import pandas as pd

from sbssl.control import control_survival
from sbssl.io import atomic_path, job_log

with job_log(snakemake.log[0]):
    table = control_survival(
        pd.read_csv(snakemake.input.original),
        pd.read_csv(snakemake.input.permuted),
        alpha=snakemake.params.alpha,
    )
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
    print(
        f"{int(table['significant'].sum())} significant, {int(table['survives'].sum())} survive, "
        f"{int((table['note'] != '').sum())} not assessed (degenerate), of {len(table)} control rows"
    )
