"""SeqIO tasks and mixtures (installed as slm_jax.tasks), registered on import.

``corpus_tasks``  the generated corpus (asr_*, ast_en_*, instruct_*, zeroshot_*) and the mixtures
                  asr_ast_instruct and asr; corpus directory from $SLM_CORPUS_DIR (default
                  data/corpus), or call ``register_corpus_tasks(corpus_dir)``
``real_corpora``  LibriSpeech and FLEURS (TFDS), CoVoST 2 and VoxPopuli (local manifests)
"""

from slm_jax.tasks.corpus_tasks import (  # noqa: F401
    ASR_MIXTURE,
    CORPUS_DIR_ENV,
    TRAINING_MIXTURE,
    corpus_mixture_names,
    corpus_task_names,
    register_corpus_tasks,
)
from slm_jax.tasks.real_corpora import real_task_names, register_real_corpus_tasks  # noqa: F401


def register_all(corpus_dir=None, vocabulary=None, prompt_format=None) -> None:
    """(Re)registers every task and mixture with one vocabulary and prompt layout."""
    from slm_jax.data.prompting import T5_PROMPT

    prompt_format = prompt_format or T5_PROMPT
    register_corpus_tasks(corpus_dir, vocabulary, prompt_format)
    from slm_jax.tasks.corpus_tasks import corpus_vocabulary, registered_corpus_dir

    register_real_corpus_tasks(vocabulary or corpus_vocabulary(registered_corpus_dir()), prompt_format)


register_all()
