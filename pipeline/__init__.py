"""pipeline: bpr_core turned into Ray Data stages (extract, refine, reassemble) and the job flow."""
