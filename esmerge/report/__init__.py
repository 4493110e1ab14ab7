"""Stage 6, report: our results beside the paper's, and the registers of its claims.

* ``paper_tables`` -- Tables 1-3 and 8 beside ``paper_results.csv``;
* ``cost`` -- Table 4: what finding the merge cost (FLOPs, seconds, peak memory), ours beside the paper's;
* ``figures`` -- the results' figures (forest plots of the claims, accuracy heatmap, retention bars) with captions;
* ``claims`` -- each claim of the paper checked against ours, with paired CIs and Holm-corrected tests,
  the AUROC difference beside accuracy, and on every row the caveats it rests on;
* ``representation_claims`` -- the representation claims (Figs. 1, 2, 8; Table 7) on the chapters' tables;
* ``summaries`` -- what this n resolves, decided verdicts, disagreements, ranks and answer bias;
* ``headline`` -- the Overview's numbers; ``budget_curves`` -- the searching baselines at several budgets;
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
                                   claims,
                                   method_label,
                                   yardstick_claims,
)
from esmerge.report.cost import Table4, cost_table, merge_folders, paper_ratios, table4
from esmerge.report.figures import (
                                   accuracy_heatmap,
                                   forest_caption,
                                   forest_plot,
                                   forest_rows,
                                   heatmap_caption,
                                   retention_bars,
                                   retention_caption,
)
from esmerge.report.paper_tables import (
                                   PAPER_DATASET,
                                   TABLE_GROUPS,
                                   group_averages,
                                   paper_results,
                                   reference_dir,
                                   results_table,
                                   wide_table,
)
from esmerge.report.representation_claims import mechanism_claims
from esmerge.report.summaries import (
                                   answer_bias,
                                   decided_verdicts,
                                   disagreements,
                                   es_ranks,
                                   power_table,
                                   resolution_sentence,
)

__all__ = [
    "CLAIMS", "COLUMNS", "Claim", "EMR_ONE_MODEL", "EMR_ROUTED", "MERGING_BASELINES", "METHOD_LABELS", "NOT_MODELS",
    "PAPER_DATASET", "SHUFFLED_CONTROL", "SPECIALISTS", "TABLE_GROUPS", "Table4", "YARDSTICKS", "accuracy_heatmap",
    "answer_bias", "claims", "cost_table", "decided_verdicts", "disagreements", "es_ranks", "forest_caption",
    "forest_plot", "forest_rows", "group_averages", "heatmap_caption", "mechanism_claims", "merge_folders",
    "method_label", "paper_ratios", "paper_results", "power_table", "reference_dir", "resolution_sentence",
    "results_table", "retention_bars", "retention_caption", "table4", "wide_table", "yardstick_claims",
]
