"""Speak sentences in corpus voices and write 'path<TAB>transcript' TSVs, one per voice: with
scripts/whisper_reference_wer.py this measures how intelligible each synthesiser's voices are.

  .venv/bin/python scripts/speak_sentences.py --out=runs/voices scripts/voice_sentences.txt \
      --voices=en-us+m3,flite:awb,piper:joe,kokoro:jm_kumo,kokoro:jf_alpha+jm_kumo
  .venv/bin/python scripts/whisper_reference_wer.py runs/voices/piper_joe.tsv

A voice is written as in a corpus example: an espeak-ng voice ('en-us+m3'), or a prefixed one
('flite:awb', 'piper:joe', 'kokoro:jf_alpha+jm_kumo'). Speech is made by the corpus's own
synthesis (slm_jax/data/corpus/builder.py) at the typical speed, without noise or augmentation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", help="a text file, one sentence a line")
    parser.add_argument("--out", required=True, help="directory for the wavs and TSVs")
    parser.add_argument("--voices", required=True, help="comma-separated corpus voices")
    args = parser.parse_args(argv)

    import soundfile

    from slm_jax.data.corpus import builder as corpus

    with open(args.sentences, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    if not sentences:
        parser.error(f"{args.sentences} holds no sentence")
    for voice in args.voices.split(","):
        name = re.sub(r"[^A-Za-z0-9_-]", "_", voice)
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        rows = []
        for i, text in enumerate(sentences):
            spec = corpus.ExampleSpec(id=f"{name}-{i:03d}", task="asr_en", split="test", lang="en", text=text,
                                      instruction="", target=text, voice=voice, speed=160, pitch=50,
                                      noise="white", noise_seed=0)
            _, pcm = corpus.synthesize(corpus._Job(spec, "espeak", float("inf")))
            path = os.path.join(name, f"{i:03d}.wav")
            soundfile.write(os.path.join(args.out, path), corpus.np.frombuffer(pcm, "<i2"), corpus.SAMPLE_RATE)
            rows.append(f"{path}\t{text}")
        tsv = os.path.join(args.out, f"{name}.tsv")
        with open(tsv, "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        print(tsv, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
