# Encoder features of every patch into one Zarr store per slide (GPU rule on clusters). A slide
# without patches, or (on_slide_error: skip) one that cannot be read, gets an empty store that
# records why; its patient counts as missing the slide.


# extract_slides_per_job (config, default 1): 1 gives rule `extract`, one job per slide (cached
# with --cache, grouped on clusters). N > 1 gives rules extract_batch_0, extract_batch_1, ...: N
# slides per `bd extract` call, the encoder and torch loaded once (about 4 CPU s a process on a
# CPU), each slide still its own store. The demo sets 40: its 80 slides in 2 jobs, one per core.
# A batch job reruns all its slides when one of them changes; these rules are not cached.
if EXTRACT_PER_JOB > 1:
    for _k, _batch in enumerate(extract_batches()):

        rule:
            name:
                f"extract_batch_{_k}"
            input:
                slides=[SLIDE_PATHS[s] for s in _batch],
                grids=[f"{R}/tiles/{s}.npz" for s in _batch],
                weights=EXTRACT_COMMON["weights"],
            output:
                stores=[directory(f"{FEATURES_DIR}/{s}.zarr") for s in _batch],
                jobs=f"{FEATURES_DIR}/batches/{_k}.tsv",
            params:
                **EXTRACT_COMMON["params"],
                table=extract_jobs_tsv(_batch),
            log:
                f"{R}/logs/extract/batch-{_k}.log",
            benchmark:
                f"{R}/benchmarks/extract/batch-{_k}.tsv"
            threads: EXTRACT_COMMON["threads"]
            resources:
                gpu=1,
            conda:
                "../../envs/bd.yaml"
            shell:
                "printf '%s' {params.table:q} > {output.jobs:q} && "
                "bd extract --jobs {output.jobs:q} --params {params.features:q} --on-error {params.on_error} "
                "--threads {threads} > {log:q} 2>&1"


rule extract:
    cache: CACHE_MODE  # between-workflow output cache with --cache (common.smk)
    input:
        slide=slide_path,
        grid=rules.tile.output.grid,
        weights=(config.get("features") or {}).get("weights") or [],  # a new checkpoint reruns extraction
    wildcard_constraints:
        slide="(?!)" if EXTRACT_PER_JOB > 1 else "[A-Za-z0-9._-]+",  # batched: rules extract_batch_* (above)
    output:
        store=directory(slide_pattern(R, "store")),
    params:
        on_error=ON_SLIDE_ERROR,
        features=section("features"),
        version=stage_version("extract"),
    log:
        f"{R}/logs/extract/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/extract/{{slide}}.tsv"
    threads: EXTRACT_COMMON["threads"]  # DataLoader workers
    resources:
        # One GPU per job: `snakemake --resources gpu=N` runs N extractions side by side on an
        # N-GPU node, and `bd extract` gives each its own device (CUDA_VISIBLE_DEVICES, bd.device.claim_gpu).
        gpu=1,
    conda:
        "../../envs/bd.yaml"
    shell:
        "bd extract --slide {input.slide:q} --grid {input.grid:q} --out {output.store:q} "
        "--params {params.features:q} --on-error {params.on_error} --threads {threads} > {log:q} 2>&1"


# One file listing every slide's store (slide_id, store): training's input for every store
# (FEATURE_INDEX in common.smk). Runs on the submit host; no job of its own on clusters; in a
# thread of Snakemake's own process (profiles/default: force-use-threads), not a re-parsing subprocess.
rule feature_index:
    input:
        STORES,
    output:
        FEATURE_INDEX,
    log:
        f"{R}/logs/feature_index.log",
    localrule: True
    run:
        write_feature_index(list(input), output[0], log[0])


# CLAM / TRIDENT .h5 feature files instead of extraction (config h5_features; bd/features/h5store.py): each
# slide's store is a link to its {slide}.h5, read with the encoder identity the user gives, which
# rule h5_identity writes beside the links. Used only when h5_features.dir is set.
H5_IDENTITY = f"{FEATURES_DIR}/h5_identity.json"


rule h5_identity:
    output:
        H5_IDENTITY,
    params:
        identity=section("h5_features"),  # a changed identity rewrites it (and reruns training)
    log:
        f"{R}/logs/h5_identity.log",
    localrule: True
    run:
        write_h5_identity(params.identity, output[0], log[0])


rule h5_link:
    input:
        h5=lambda w: os.path.join(H5_FEATURES["dir"], f"{w.slide}.h5"),
        identity=H5_IDENTITY,
    output:
        f"{R}/features/{{slide}}.h5",
    log:
        f"{R}/logs/h5_link/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/h5_link/{{slide}}.tsv"
    localrule: True
    conda:
        "../../envs/bd.yaml"
    shell:
        "ln -sfn \"$(realpath {input.h5:q})\" {output:q} && echo linked {input.h5:q} > {log:q}"
