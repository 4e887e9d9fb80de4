/** Training ReFT interventions: the public surface of src/training. */
export { Trainer, type TrainerModel, type TrainerOptions, type TrainingOutcome, type TrainingProgress } from './trainer.ts';
export { parseRecipe, recipeSchema, interventionSpecs, LR_SCHEDULERS, type Recipe, type RecipeInput } from './recipe.ts';
export { tokenizeRows, type TrainingRow } from './data.ts';
export { encodeCheckpoint, decodeCheckpoint, type TrainingCheckpoint } from './checkpoint.ts';
export { buildArtifact, type TrainedArtifact, type ArtifactInfo } from './output.ts';
export { TrainingGraph, type TrainingBatch, type TrainingResult, type LayerGradients, type LayerTrainingFeed, type TrainingGraphOptions } from './training-graph.ts';
export { StackLayout, packBatch, allocateFactors, type TrainingExample } from './batch.ts';
export { initialTensors, kindGradients, writeLowRank, type KindTensors } from './kinds.ts';
