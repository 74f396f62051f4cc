# The synthetic demo cohort, written in the BCNB layout (slides, clinical table, split files), plus
# its ground truth: latent risk (oracle), tissue/artefact outlines, and tumour annotations.

DEMO = config.get("demo") or {}

if DEMO.get("enabled"):
    from pathlib import Path as _Path

    from bd.errors import ConfigError

    for _key, _name in (("clinical_table", "patient-clinical-data.xlsx"), ("split_dir", "dataset-splitting")):
        if _Path(config["cohort"][_key]) != _Path(DEMO["out_dir"]) / _name:
            raise ConfigError(
                f"cohort.{_key} is {config['cohort'][_key]!r} but the demo writes "
                f"{_Path(DEMO['out_dir']) / _name}: make them agree (demo.out_dir = {DEMO['out_dir']!r})"
            )

    rule demo:
        output:
            slides=list(SAMPLES["path"]),
            table=config["cohort"]["clinical_table"],
            split=multiext(f"{config['cohort']['split_dir']}/", "train_id.txt", "val_id.txt", "test_id.txt"),
            latent=f"{DEMO['out_dir']}/latent_risk.csv",
            artefacts=f"{DEMO['out_dir']}/artefacts.json",
            **({"annotations": directory(f"{DEMO['out_dir']}/annotations")} if DEMO.get("annotations") else {}),
        params:
            demo=section("demo"),
            version=stage_version("demo"),
            out_dir=lambda w, output: os.path.dirname(output.latent),
        log:
            f"{R}/logs/demo.log",
        benchmark:
            f"{R}/benchmarks/demo.tsv"
        threads: 2
        conda:
            "../../envs/bd.yaml"
        shell:
            "bd demo --params {params.demo:q} --out-dir {params.out_dir:q} --workers {threads} > {log:q} 2>&1"
