import { z } from 'zod';
import { ReftError } from '../../errors.ts';
import { parsePositions } from '../../interventions/positions.ts';

/**
 * The wire form of request-time control (REFT.md "Request-time control"), shared by
 * /v1/generate, the OpenAI routes (an extra body field) and saved compositions.
 */

/** Artifacts one request (or composition) may combine: each is a few more rows of rank columns. */
export const MAX_STEER_ITEMS = 8;
export const MAX_STRENGTH = 10;

const positionSpec = z
  .string()
  .max(32)
  .superRefine((spec, ctx) => {
    try {
      parsePositions(spec);
    } catch (err) {
      // the spec's own message, without the field prefix zod adds itself
      ctx.addIssue({ code: 'custom', message: err instanceof ReftError ? err.message.replace(/^positions: /, '') : 'is invalid' });
    }
  });

export const steerItemSchema = z.strictObject({
  intervention: z.string().min(1).max(200).describe('a stored intervention, by id or name (not a composition)'),
  strength: z
    .number()
    .min(-MAX_STRENGTH)
    .max(MAX_STRENGTH)
    .optional()
    .describe('scales every edit of the artifact: h + strength·c(h)·A (default 1; 0 is the base model, negative reverses it)'),
  layers: z
    .array(z.number().int().min(0))
    .min(1)
    .max(1024)
    .refine((ls) => new Set(ls).size === ls.length, 'lists a layer twice')
    .optional()
    .describe("keep only the artifact's interventions on these layers (each one of the artifact's layers)"),
  positions: positionSpec.optional().describe('fN, lN or fN+lN: replaces the position spec of every intervention of the artifact'),
});

export const steerListSchema = z
  .array(steerItemSchema)
  .min(1)
  .max(MAX_STEER_ITEMS)
  .describe(`several stored interventions applied together, each with its own settings (at most ${MAX_STEER_ITEMS})`);

export const returnCoefficientsField = z
  .boolean()
  .default(false)
  .describe("add `applied`: each applied intervention's coefficients c(h) at its prompt positions, before the strength");

/** One intervention's readout: its layer, the prompt positions it edited (ascending), c(h) at each. */
export const appliedEditSchema = z.object({
  layer: z.number().int(),
  positions: z.array(z.number().int()),
  coefficients: z.array(z.array(z.number())).describe('one vector of rank values per position'),
});

export const appliedSchema = z
  .array(z.array(appliedEditSchema))
  .describe(
    "per request item in request order (one for `adapter`), per intervention in its config's order (those left out by `layers` omitted)",
  );

export const promptTokenTextsSchema = z.array(z.string()).describe('the text of each prompt token, the rows `positions` index');
