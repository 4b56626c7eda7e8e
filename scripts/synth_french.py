"""Synthesize the committed French speech fixture with espeak-ng.

    .venv/bin/python -m scripts.synth_french [--out fixtures/french] [--voices-per-sentence 2]

Each sentence is spoken by a few voices at varied speeds, resampled to 16 kHz mono, padded with
0.5 s of silence at each end and stored as OGG/Vorbis. Splits are made BY SENTENCE (no sentence
in two splits), about 70/10/20 % train/dev/test, with a fixed seed, so the output is reproducible.
Then every test sentence is also spoken by each voice it does not have yet (--all-voices-on-test),
its own seeded stream, appended after the other rows: the first test clips stay the ones a
config's data.max_eval_samples has always taken, and `make bench` scores all 180 (the paired 95 %
interval of its int4-minus-fp32 WER gap: 5.4 points wide on 180 clips, 8.4 on the first 60, 12.7 on 24).
Writes <out>/audio/*.ogg and <out>/manifest.jsonl: {"id", "audio" (relative to the repository
root), "text", "speaker", "split", "duration"}.

Voices: whisper base hears espeak voices very differently (docs/REFERENCE.md section 5). Measured here
(converted whisper-base, greedy, max 128 new tokens, 60 test clips of an 8-voice draft, WER %
per voice over 30-80 words each): fr+m3 58, fr+f2 63, fr-ch+m1 74, fr-be 79, fr+m7 83, fr+f3 96,
fr-be+f2 133, fr+Denis 264; the last two were dropped. Loops are per clip, not per voice: on the
6-voice fixture one fr-be clip loops (corpus WER 109.5 %, 84 % without it). Per-voice figures on
so few words are noisy. Re-measure: evaluate's utterances_base_fp32.csv (ids end with the voice).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent

VOICES = ["fr+m3", "fr+f2", "fr-ch+m1", "fr-be", "fr+m7", "fr+f3"]
SPEEDS = [135, 150, 165]
SAMPLE_RATE = 16000
PAD_SECONDS = 0.5

SENTENCES = """\
Bonjour, je m'appelle Pierre et j'habite à Paris depuis vingt ans.
Le train pour Lyon part à huit heures et quart.
Il fait très beau aujourd'hui, allons nous promener au parc.
Où se trouve la gare la plus proche, s'il vous plaît ?
Ma sœur a trois enfants et deux chats.
Nous avons acheté du pain, du fromage et une bouteille de vin.
Le musée du Louvre est fermé le mardi.
Pouvez-vous répéter la question plus lentement ?
J'ai rendez-vous chez le médecin à quinze heures trente.
La réunion est reportée au lundi douze mars.
Elle est née le quatorze juillet mille neuf cent quatre-vingt-quatre.
Combien coûte ce livre ? Il coûte vingt et un euros.
Les enfants jouent dans la cour de l'école.
Marie et Jean se sont mariés l'été dernier à Bordeaux.
Je voudrais réserver une table pour quatre personnes.
Le directeur a présenté les résultats de l'année.
Quelle heure est-il maintenant ?
Il y a soixante-dix élèves dans cette classe.
L'hiver a été long et froid cette année.
Nous partirons en vacances au mois d'août.
Mon numéro de téléphone commence par zéro six.
La bibliothèque ouvre ses portes à neuf heures.
Est-ce que tu as vu le film hier soir ?
Le chef cuisine une excellente soupe à l'oignon.
Madame Dupont travaille à la mairie depuis dix ans.
Monsieur Martin prend le bus tous les matins.
Il a plu toute la nuit sur la ville de Nantes.
J'aime lire des romans policiers le dimanche.
La voiture rouge est garée devant la maison.
Ils ont gagné le match trois buts à un.
Le prix de l'essence a encore augmenté.
Qui a mangé le dernier morceau de gâteau ?
Nous habitons au troisième étage d'un vieil immeuble.
Le médecin lui a conseillé de se reposer.
Les oiseaux chantent dès le lever du soleil.
Paul a oublié son parapluie dans le métro.
La tour Eiffel mesure environ trois cents mètres.
Je n'ai pas compris ce que vous avez dit.
Le marché a lieu chaque samedi sur la place.
Elle a quatre-vingts ans et elle court encore.
Mon frère joue de la guitare depuis l'enfance.
Il faut arroser les fleurs du jardin.
Le professeur explique la leçon aux élèves.
Nous avons visité Marseille, Toulouse et Strasbourg.
La poste est à deux cents mètres d'ici.
Avez-vous déjà goûté la cuisine bretonne ?
Le spectacle commence dans dix minutes.
Le chat dort sur le canapé du salon.
J'ai perdu mes clés ce matin.
L'avion atterrit à Nice à dix-sept heures.
Le boulanger ouvre sa boutique très tôt.
Elle parle français, anglais et espagnol.
Il reste cinquante places dans la salle.
Les feuilles tombent en automne.
Pourquoi es-tu arrivé en retard ?
Le café est trop chaud pour être bu.
Nous fêtons l'anniversaire de Lucie samedi prochain.
Les magasins ferment à dix-neuf heures.
Cette entreprise emploie mille deux cents personnes.
Le fleuve traverse toute la région.
Je prends toujours un thé au petit déjeuner.
Sophie a obtenu son diplôme en juin.
La neige recouvre les montagnes des Alpes.
Il a lu ce livre en une seule journée.
Le concert a été annulé à cause de la pluie.
Tu peux fermer la fenêtre, s'il te plaît ?
Notre équipe a terminé le projet à temps.
Le jardinier plante des tomates et des salades.
La mer est calme ce matin.
Il habite au numéro quarante-deux de la rue Victor Hugo.
On se retrouve devant le cinéma à vingt heures.
Les étudiants préparent leurs examens de fin d'année.
La boulangerie du coin vend d'excellents croissants.
Mon grand-père racontait souvent des histoires de guerre.
Le ciel est couvert de nuages gris.
Elle a acheté une robe bleue pour la fête.
Le bureau se trouve au bout du couloir.
Nous avons besoin de trois œufs pour la recette.
Le président a prononcé un long discours.
Les vacances d'été durent deux mois.
J'ai écrit une lettre à ma grand-mère.
Le chien aboie quand quelqu'un sonne à la porte.
Combien de temps faut-il pour aller à Lille ?
La pharmacie est ouverte jusqu'à vingt heures.
Le livre est posé sur la table de la cuisine.
Ils construisent un nouveau pont sur la rivière.
Antoine travaille comme ingénieur à Grenoble.
Le film dure deux heures et demie.
J'ai couru dix kilomètres ce matin.
La fête de la musique a lieu le vingt et un juin.
Les pommes de ce verger sont délicieuses.
Nous attendons le bus depuis un quart d'heure.
Le voisin répare sa bicyclette dans la cour.
Quel temps fera-t-il demain ?
Elle a gagné le premier prix du concours.
Le train a eu trente minutes de retard.
Mes parents vivent à la campagne.
Il faut éteindre la lumière en sortant.
Le musicien accorde son violon avant le concert.
L'hôpital se trouve à l'entrée de la ville.
Nous avons dîné dans un petit restaurant italien.
Julien a acheté une maison en Normandie.
Les enfants ont construit un château de sable.
La conférence aura lieu le premier avril.
Je cherche un appartement de deux pièces.
La lune brille dans le ciel.
Le facteur passe vers onze heures.
Elle boit un verre d'eau fraîche.
Cette chanson me rappelle mon enfance.
Le magasin propose une réduction de quinze pour cent.
Les élèves ont visité une ferme la semaine dernière.
Mon ordinateur est tombé en panne hier.
Nous irons à la plage si le temps le permet.
Le gardien ferme le parc à la tombée de la nuit.
Il parle trop vite, je ne comprends rien.
La voiture consomme six litres aux cent kilomètres.
Claire a peint un tableau magnifique.
Le bateau quitte le port à l'aube.
Les pompiers sont arrivés très rapidement.
Je dois rendre ce dossier avant vendredi.
L'église du village date du douzième siècle.
Tu veux du sucre dans ton café ?
La ville compte environ cent mille habitants.
Les fraises sont mûres au printemps.
Il neige depuis ce matin sur les routes.
Le boucher coupe la viande avec soin.
Nous avons raté le dernier métro.
Le roi Louis quatorze a fait construire Versailles.
La lettre est arrivée avec trois jours de retard.
Elle apprend à nager à la piscine municipale.
Le vent souffle fort sur la côte.
J'ai oublié de fermer la porte à clé.
Les vendanges commencent en septembre.
Ce tableau vaut plus d'un million d'euros.
Le petit garçon a peur du noir.
Nous avons planté un arbre dans le jardin.
La réunion se termine à midi.
Thomas est parti travailler au Canada.
On entend les cloches de l'église le dimanche.
Le serveur apporte l'addition.
Elle a lu le journal en prenant son petit déjeuner.
Le sentier monte jusqu'au sommet de la colline.
Le cœur de la ville est très animé le soir.
Ils ont vendu leur vieille voiture.
Le gâteau au chocolat est prêt.
Je vous remercie pour votre aide précieuse.
Le chauffeur a klaxonné deux fois.
En mille neuf cent quatre-vingt-dix-huit, la France a gagné la coupe du monde.
Les touristes photographient la cathédrale.
Il est minuit et tout le monde dort.
"""


def sentences() -> list[str]:
    return [s.strip() for s in SENTENCES.splitlines() if s.strip()]


def synthesize(text: str, voice: str, speed: int, tmp: Path) -> np.ndarray:
    """espeak-ng -> 16 kHz mono float32 with PAD_SECONDS of silence at each end."""
    wav = tmp / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
    out = tmp / "16k.wav"
    subprocess.run(["sox", str(wav), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out),
                    "pad", str(PAD_SECONDS), str(PAD_SECONDS)], check=True, capture_output=True)
    audio, sr = sf.read(out, dtype="float32")
    assert sr == SAMPLE_RATE and audio.ndim == 1
    return audio


def split_of(index: int, n: int, order: list[int]) -> str:
    """70/10/20 by position in a seeded shuffle of sentence indices."""
    rank = order.index(index)
    if rank < round(0.7 * n):
        return "train"
    return "dev" if rank < round(0.8 * n) else "test"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "fixtures" / "french")
    ap.add_argument("--voices-per-sentence", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--all-voices-on-test", action=argparse.BooleanOptionalAction, default=True,
                    help="append each test sentence in every voice it lacks (default: on)")
    args = ap.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install espeak-ng sox")
    texts = sentences()
    rng = random.Random(args.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    audio_dir = args.out / "audio"
    shutil.rmtree(audio_dir, ignore_errors=True)
    audio_dir.mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def speak(i: int, text: str, voice: str, speed: int, split: str) -> None:
            audio = synthesize(text, voice, speed, Path(tmp))
            uid = f"s{i:03d}-{voice.replace('+', '_')}"
            path = audio_dir / f"{uid}.ogg"
            sf.write(path, audio, SAMPLE_RATE, format="OGG", subtype="VORBIS")
            rows.append({"id": uid, "audio": str(path.resolve().relative_to(REPO)), "text": text,
                         "speaker": voice, "split": split, "duration": round(len(audio) / SAMPLE_RATE, 3)})

        for i, text in enumerate(texts):
            split = split_of(i, len(texts), order)
            for voice in rng.sample(VOICES, args.voices_per_sentence):
                speak(i, text, voice, rng.choice(SPEEDS), split)
            print(f"{i + 1}/{len(texts)} {split}: {text}", flush=True)
        if args.all_voices_on_test:
            extra = random.Random(args.seed + 1)  # its own stream: the rows above do not change
            spoken = {(r["text"], r["speaker"]) for r in rows}
            for i, text in enumerate(texts):
                if split_of(i, len(texts), order) == "test":
                    for voice in (v for v in VOICES if (text, v) not in spoken):
                        speak(i, text, voice, extra.choice(SPEEDS), "test")
            print(f"test sentences in every voice: {sum(r['split'] == 'test' for r in rows)} test clips", flush=True)
    with open(args.out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "dev", "test")}
    size = sum(p.stat().st_size for p in audio_dir.iterdir()) / 1e6
    print(f"wrote {len(rows)} clips ({counts}), {sum(r['duration'] for r in rows) / 60:.1f} min, {size:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
