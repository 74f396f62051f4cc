# Encoder features of every patch into one Zarr store per slide (GPU rule on clusters).


rule extract:
    input:
        slide=slide_path,
        grid=rules.tile.output.grid,
    output:
        store=directory(f"{R}/features/{{slide}}.zarr"),
    params:
        features=section("features"),
    log:
        f"{R}/logs/extract/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/extract/{{slide}}.tsv"
    threads: 2
    shell:
        "bd extract --slide {input.slide:q} --grid {input.grid:q} --out {output.store:q} "
        "--params {params.features:q} > {log:q} 2>&1"
