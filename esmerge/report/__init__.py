"""Stage 6, report: our results beside the paper's, and the registers of its claims.

* ``paper_tables`` -- Tables 1-3 and 8 beside ``paper_results.csv``, Table 4's cost;
* ``claims`` -- each claim of the paper checked against ours, with paired CIs and Holm-corrected tests,
  the AUROC difference beside accuracy, and on every row the caveats it rests on;
* ``merged_adapters`` -- merged adapters compared with each other and with the specialists (chapter 6);
* ``es_coefficients`` -- ES-Merging's coefficients and the merged model's tokens (chapter 5).
"""
from esmerge.report.claims import (
                                   CLAIMS,
                                   COLUMNS,
                                   EMR_ONE_MODEL,
                                   EMR_ROUTED,
                                   MERGING_BASELINES,
                                   METHOD_LABELS,
                                   NOT_MODELS,
                                   SHUFFLED_CONTROL,
                                   SPECIALISTS,
                                   YARDSTICKS,
                                   Claim,
                                   answer_bias,
                                   claims,
                                   decided_verdicts,
                                   disagreements,
                                   es_ranks,
                                   mechanism_claims,
                                   method_label,
                                   power_table,
                                   yardstick_claims,
)
from esmerge.report.paper_tables import (
                                   PAPER_DATASET,
                                   TABLE_GROUPS,
                                   cost_table,
                                   group_averages,
                                   merge_folders,
                                   paper_results,
                                   reference_dir,
                                   results_table,
                                   wide_table,
)

__all__ = [
    "CLAIMS", "COLUMNS", "Claim", "EMR_ONE_MODEL", "EMR_ROUTED", "MERGING_BASELINES", "METHOD_LABELS", "NOT_MODELS",
    "PAPER_DATASET", "SHUFFLED_CONTROL", "SPECIALISTS", "TABLE_GROUPS", "YARDSTICKS", "answer_bias", "claims",
    "cost_table", "decided_verdicts", "disagreements", "es_ranks", "group_averages", "mechanism_claims",
    "merge_folders", "method_label", "paper_results", "power_table", "reference_dir", "results_table", "wide_table",
    "yardstick_claims",
]
