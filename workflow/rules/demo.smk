# The synthetic demo cohort, written in the BCNB layout (slides, clinical table, split files).

DEMO = config.get("demo") or {}

if DEMO.get("enabled"):

    rule demo:
        output:
            slides=list(SAMPLES["path"]),
            table=config["cohort"]["clinical_table"],
            split=multiext(f"{config['cohort']['split_dir']}/", "train_id.txt", "val_id.txt", "test_id.txt"),
            latent=f"{DEMO['out_dir']}/latent_risk.csv",
        params:
            demo=section("demo"),
            out_dir=DEMO["out_dir"],
        log:
            f"{R}/logs/demo.log",
        benchmark:
            f"{R}/benchmarks/demo.tsv"
        threads: 2
        shell:
            "bd demo --params {params.demo:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
