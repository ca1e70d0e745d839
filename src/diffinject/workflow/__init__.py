"""Running the method: the stage plan (`pipeline`), the resumable step runner (`runner`) and ablation
studies over pipeline variants (`study`)."""
