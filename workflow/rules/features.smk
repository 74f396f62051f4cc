# Encoder features of every patch into one Zarr store per slide (GPU rule on clusters). A slide
# without patches, or (on_slide_error: skip) one that cannot be read, gets an empty store that
# records why; its patient counts as missing the slide.


rule extract:
    cache: CACHE_MODE  # between-workflow output cache with --cache (common.smk)
    input:
        slide=slide_path,
        grid=rules.tile.output.grid,
        weights=(config.get("features") or {}).get("weights") or [],  # a new checkpoint reruns extraction
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
    threads: max(1, (config.get("features") or {}).get("num_workers", 2))  # DataLoader workers
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
# (FEATURE_INDEX in common.smk). Runs on the submit host; no job of its own on clusters.
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
