from llm_finetune.finetuning import console_main

console_main()
