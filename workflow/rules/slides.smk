# Per-slide tissue segmentation and patch tiling (one job per slide, grouped on clusters).
# segment: mask.png (0/255 at ~32x), artefacts.png (pen ink and debris at the same scale, read by
# tile to drop patches holding them), mask.json (its exact scale to level 0, read by tile),
# contours.geojson (level-0 polygons with holes), qc.png. Flat images (BCNB's JPEGs) are read
# directly, in bounded memory (bd/slides/slide.py). A sample sheet's optional `mpp` column gives a
# slide's microns per pixel (--mpp, overriding its metadata); cohort.fallback_mpp stands in for
# missing metadata. With on_slide_error: skip, an unreadable
# slide gets empty outputs and a QC image saying so; tile then writes an empty grid for it (as it
# does for a slide that fails while tiling), recording the error for rule slide_qc (qc.smk). The
# policy is in the command, not in params: switching it does not rerun slides that were read.


# A slide's one-slide rules take no slide when slides are batched (rules segment_tile_batch_*, below).
PER_SLIDE = "(?!)" if SEGMENT_PER_JOB > 1 else "[A-Za-z0-9._-]+"


rule segment:
    cache: CACHE_MODE  # between-workflow output cache with --cache (common.smk)
    input:
        slide=slide_path,
    wildcard_constraints:
        slide=PER_SLIDE,
    output:
        mask=slide_pattern(R, "mask"),
        artefacts=slide_pattern(R, "artefacts"),
        info=slide_pattern(R, "mask_info"),
        contours=slide_pattern(R, "contours"),
        qc=slide_pattern(R, "segment_qc"),  # full size; the report shows a compact copy (rule report_qc_images)
    params:  # what slide_shell's placeholders name (common.smk)
        on_error=SLIDE_SETTINGS["on_error"],
        seg=SLIDE_SETTINGS["seg"],
        version=stage_version("segment"),
        fallback_mpp=SLIDE_SETTINGS["fallback_mpp"],
        mpp=lambda w: mpp_option(SAMPLES, w.slide),
    log:
        f"{R}/logs/segment/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/segment/{{slide}}.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        slide_shell(segment_argv)  # the arguments the batch rules pass too


rule tile:
    cache: CACHE_MODE  # between-workflow output cache with --cache (common.smk)
    input:
        slide=slide_path,
        mask=rules.segment.output.mask,
        artefacts=rules.segment.output.artefacts,
        info=rules.segment.output.info,
    wildcard_constraints:
        slide=PER_SLIDE,
    output:
        grid=slide_pattern(R, "grid"),
        qc=slide_pattern(R, "grid_qc"),  # full size; the report shows a compact copy (rule report_qc_images)
    params:
        on_error=SLIDE_SETTINGS["on_error"],
        tiling=SLIDE_SETTINGS["tiling"],
        version=stage_version("tile"),
        fallback_mpp=SLIDE_SETTINGS["fallback_mpp"],
        annotations=SLIDE_SETTINGS["annotations"],
        mpp=lambda w: mpp_option(SAMPLES, w.slide),
    log:
        f"{R}/logs/tile/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/tile/{{slide}}.tsv"
    conda:
        "../../envs/bd.yaml"
    shell:
        slide_shell(tile_argv)


# segment_slides_per_job (config, default 1): 1 gives rules segment and tile, one job per slide
# (cached with --cache, grouped on clusters). N > 1 gives rules segment_tile_batch_0, ...: N slides
# per `bd batch` job (bd/workflow/batch.py), each slide's `bd segment` then `bd tile` exactly as
# the one-slide rules run them (the same segment_argv and tile_argv build both, common.smk), each
# with its own log, so Python and OpenCV start once a job instead of twice a slide (the demo's 160
# one-slide jobs spent more in start-up than in work).
# The same outputs; a batch reruns all its slides when one changes; these rules are not cached.


SEGMENT_KINDS = ("mask", "artefacts", "mask_info", "contours", "segment_qc", "grid", "grid_qc")
if SEGMENT_PER_JOB > 1:
    for _k, _batch in enumerate(slide_batches(SEGMENT_PER_JOB)):

        rule:
            name:
                f"segment_tile_batch_{_k}"
            input:
                slides=[SLIDE_PATHS[s] for s in _batch],
            output:
                **{kind: [slide_output(R, kind, s) for s in _batch] for kind in SEGMENT_KINDS},
                jobs=f"{R}/segment/batches/{_k}.jsonl",
            params:
                jobs=slide_batch_jobs(_batch),
                version=[stage_version("segment"), stage_version("tile")],
            log:
                f"{R}/logs/segment/batch-{_k}.log",
            benchmark:
                f"{R}/benchmarks/segment/batch-{_k}.tsv"
            conda:
                "../../envs/bd.yaml"
            shell:
                "printf '%s' {params.jobs:q} > {output.jobs:q} && bd batch --jobs {output.jobs:q} > {log:q} 2>&1"
