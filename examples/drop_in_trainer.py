"""An ordinary Hugging Face fine-tuning script, turned into block-diffusion SFT by changing one import.

Everything below is the usual `Trainer` boilerplate: plain `TrainingArguments`, a chat dataset with a
`messages` column, a tokenizer passed as `processing_class`. `DiffusionTrainer` upgrades the arguments to
`DiffusionTrainingArguments` with the diffusion defaults (block size 32, mask rate 0.3-0.8, same-position
labels), tokenizes the conversations into EOS-filled documents and trains with the block-diffusion loss.

    python examples/drop_in_trainer.py          # CPU, about a minute, shipped tiny model and tokenizer
"""

from transformers import AutoTokenizer, TrainingArguments

from dfactory_hf import DiffusionTrainer as Trainer  # the only change from a causal-LM script
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import DEMO_TOKENIZER_PATH
from dfactory_hf.models.llada2_moe import LLaDA2MoeForCausalLM, shipped_config


def main():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER_PATH)
    model = LLaDA2MoeForCausalLM(shipped_config("tiny", pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id))
    dataset = make_arithmetic_dataset(2000, 100, seed=0)
    args = TrainingArguments(
        output_dir="outputs/drop-in",
        max_steps=100,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
                      processing_class=tokenizer)
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
