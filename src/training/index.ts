/** Training ReFT interventions: the public surface of src/training. */
export { Trainer, type TrainerModel, type TrainerOptions, type TrainingOutcome, type TrainingProgress } from './trainer.ts';
export { parseRecipe, recipeSchema, LR_SCHEDULERS, type Recipe, type RecipeInput } from './recipe.ts';
export { tokenizeRows, type TrainingRow } from './data.ts';
export { encodeCheckpoint, decodeCheckpoint, type TrainingCheckpoint } from './checkpoint.ts';
export type { TrainedArtifact, ArtifactInfo } from './output.ts';
export type { TrainingExample } from './batch.ts';
